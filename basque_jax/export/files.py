"""The files around the weights of an export, and writing OUT_DIR all-or-nothing.

* :func:`staged_dir` builds the export in a hidden sibling directory and renames it into place
  only once everything is written: an interrupted export never leaves a folder that looks
  complete (a leftover ``.NAME.partial-*`` is plainly unfinished).
* :func:`generation_config` writes the backbone's ``generation_config.json`` and, for an
  instructed Llama 3.1 backbone, makes sure every turn-ending token stops generation.
* :func:`copy_tokenizer` copies the backbone's tokenizer files (or saves the run's tokenizer).
* :class:`ModelFiles` writes all of them for one source (:func:`run_files`,
  :func:`folder_files`): what an export carries besides the weights, also used by
  evaluation to tokenize and prompt a training run exactly as its export would be.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from basque_jax.errors import UserError
from basque_jax.model.config import LlamaConfig
from basque_jax.yaml_config import read_json_object

if TYPE_CHECKING:
    from basque_jax.config import RunConfig
    from basque_jax.data.config import DataConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja")
# <|end_of_text|>, <|eom_id|>, <|eot_id|>: Meta's generation_config.json of Llama 3.1 Instruct.
LLAMA31_INSTRUCT_STOP_IDS = [128001, 128008, 128009]
# Meta's sampling defaults for Llama 3.1 Instruct (used when the backbone ships none).
LLAMA31_INSTRUCT_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}


class ExportError(UserError):
    """An export that cannot be done as asked (the message says why and what to do)."""


def check_out_dir(out: Path, overwrite: bool, sources: list[Path]) -> None:
    """Refuse a non-empty OUT_DIR without ``overwrite``, and any OUT_DIR whose replacement
    would delete one of ``sources``."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: OUT_DIR exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out}: OUT_DIR is not empty; pass --overwrite to replace it")
    target = out.resolve()
    for src in sources:
        resolved = src.resolve()
        if resolved == target or target in resolved.parents:
            raise ExportError(f"{out}: OUT_DIR would replace the source {src}; choose another")


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh hidden directory next to ``out``; on success it replaces ``out``.

    On any error the staging directory is removed and ``out`` is left untouched.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.replace(old)
    tmp.replace(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_llama31_instruct(config: LlamaConfig, generation: dict[str, Any], name: str) -> bool:
    """An instructed Llama 3.x backbone (its vocabulary): its generation config stops on
    ``<|eot_id|>`` (128009), or its name says ``Instruct`` (``Llama-3.1-8B-Instruct``)."""
    eos = generation.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos]
    return config.vocab_size >= 128256 and (128009 in eos or "instruct" in name.lower())


def generation_config(config: LlamaConfig, backbone: Path | None, name: str,
                      chat_stop_ids: tuple[int, ...] = ()) -> dict[str, Any]:
    """The backbone's ``generation_config.json`` (or one from ``config``), with the Llama 3.1
    Instruct stop ids when the backbone is an instructed Llama 3.x, and ``chat_stop_ids`` (the
    end of turn of the chat template a run trained with) among the eos ids."""
    path = None if backbone is None else backbone / "generation_config.json"
    if path is not None and path.is_file():
        d = read_json_object(path, ExportError)
    else:
        d = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
        d = {k: v for k, v in d.items() if v is not None}
    first: list[int] = list(chat_stop_ids)
    if is_llama31_instruct(config, d, name):
        if not (path is not None and path.is_file()):
            d.update(LLAMA31_INSTRUCT_SAMPLING)
        first = LLAMA31_INSTRUCT_STOP_IDS + first
    if first:
        eos = d.get("eos_token_id")
        eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
        d["eos_token_id"] = list(dict.fromkeys(first + eos))
    return d


def write_generation_config(folder: Path, config: LlamaConfig, backbone: Path | None,
                            name: str, chat_stop_ids: tuple[int, ...] = ()) -> Path:
    path = folder / "generation_config.json"
    d = generation_config(config, backbone, name, chat_stop_ids)
    path.write_text(json.dumps(d, indent=2) + "\n")
    return path


def write_chat_template(folder: Path, template: str) -> str:
    """Ship ``template`` as the tokenizer's chat template (``chat_template.jinja``, which
    transformers and vLLM read), replacing any in ``tokenizer_config.json``."""
    (folder / "chat_template.jinja").write_text(template)
    config = folder / "tokenizer_config.json"
    if config.is_file():
        d = json.loads(config.read_text())
        if d.pop("chat_template", None) is not None:
            config.write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n")
    return "chat_template.jinja"


def copy_tokenizer(folder: Path, backbone: Path | None, fallback: str | None = None) -> list[str]:
    """Copy the backbone's tokenizer files into ``folder``; without any, save the tokenizer
    ``fallback`` names (a run's ``data.tokenizer``) as a Hugging Face tokenizer. Returns the
    file names written."""
    for src in (backbone, Path(fallback) if fallback and fallback != "demo" else None):
        if src is None or not src.is_dir():
            continue
        copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
        for name in copied:
            shutil.copy2(src / name, folder / name)
        if copied:
            return copied
    if not fallback:
        return []
    from basque_jax.data.tokenizer import load_tokenizer

    before = set(os.listdir(folder))
    load_tokenizer(fallback).save(folder)
    return sorted(set(os.listdir(folder)) - before)


def chat_training(data: DataConfig | None, folder: Path) -> tuple[str | None, tuple[int, ...]]:
    """For a run that trained on conversations (``data``), with its tokenizer files in
    ``folder``: the chat template to ship (None when the tokenizer already renders the same
    format) and its end-of-turn ids."""
    chat = data is not None and any(s.kind in ("chat", "instruction") for s in data.sources)
    if not chat or not (folder / "tokenizer.json").is_file():
        return None, ()
    from basque_jax.data.chat import DEFAULT_DATE
    from basque_jax.data.templates import make_chat_encoder, shipped_template
    from basque_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(folder)
    encoder = make_chat_encoder(tokenizer, data.chat_template, date_string=data.chat_date,
                                system_prompt=data.system_prompt)
    own = bool(tokenizer.chat_template) and data.chat_template in ("auto", "llama31") and \
        data.chat_date == DEFAULT_DATE and not data.system_prompt
    return (None if own else shipped_template(encoder)), encoder.stop_ids


def backbone_name(folder: Path) -> str:
    """The folder's name and its config's ``_name_or_path`` (for Instruct detection)."""
    try:
        name_or_path = json.loads((folder / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        name_or_path = None
    return " ".join(filter(None, [folder.name, name_or_path]))


@dataclass(frozen=True)
class ModelFiles:
    """What a merged export writes besides the weights, for one source.

    config: the model's; backbone: the HF folder whose tokenizer and generation config are
    copied (None for a random preset); name: the backbone's name (Instruct detection);
    tokenizer / data: a training run's ``data.tokenizer`` and data section (its chat template).
    """

    config: LlamaConfig
    backbone: Path | None
    name: str
    tokenizer: str | None = None
    data: DataConfig | None = None

    def write(self, folder: Path) -> list[str]:
        """Tokenizer files, the chat template a run trained with, ``generation_config.json``
        into ``folder``; returns the file names written."""
        names = copy_tokenizer(folder, self.backbone, self.tokenizer)
        template, stops = chat_training(self.data, folder)
        if template is not None:
            names.append(write_chat_template(folder, template))
        names.append(write_generation_config(folder, self.config, self.backbone, self.name,
                                             stops).name)
        return names


def folder_files(folder: Path, config: LlamaConfig) -> ModelFiles:
    """The files of an export of the Hugging Face folder ``folder``."""
    return ModelFiles(config, folder, backbone_name(folder))


def run_files(cfg: RunConfig, config: LlamaConfig) -> ModelFiles:
    """The files of an export of a training run with config ``cfg`` and model ``config``."""
    from basque_jax.model.gguf import model_path

    backbone = model_path(cfg.model.init_from) if cfg.model.init_from else None
    name = backbone_name(backbone) if backbone is not None else cfg.model.preset or ""
    return ModelFiles(config, backbone, name, cfg.data.tokenizer, cfg.data)
