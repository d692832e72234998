"""Hugging Face safetensors checkpoints ⇄ our NNX Llama, through ONE key map.

HF stores linear weights as ``[out, in]`` per layer (``model.layers.{i}.self_attn.q_proj.weight``);
we store kernels as ``[in, out]`` stacked over layers (``layers.self_attn.q_proj.kernel``).
HF already uses the half-split rotary layout, so q/k need no permutation.

Loading places every tensor straight onto its target sharding with
``jax.make_array_from_callback``: each device shard is read from the memory-mapped file on its
own, so a 70B checkpoint never sits whole in host memory. Saving streams one layer's tensor at a
time into size-limited shards plus ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from basque_jax.errors import InputNotFound, UserError
from basque_jax.model.config import LlamaConfig
from basque_jax.model.llama import Llama
from basque_jax.model.safetensors_io import SafetensorsFile, write_safetensors
from basque_jax.sharding import DEFAULT_RULES, MeshAxes, logical_to_spec, to_host

# Our parameter path inside ``layers`` → HF name inside ``model.layers.{i}``.
LAYER_KEYS: dict[tuple[str, ...], str] = {
    ("input_layernorm", "weight"): "input_layernorm.weight",
    ("post_attention_layernorm", "weight"): "post_attention_layernorm.weight",
    ("self_attn", "q_proj", "kernel"): "self_attn.q_proj.weight",
    ("self_attn", "k_proj", "kernel"): "self_attn.k_proj.weight",
    ("self_attn", "v_proj", "kernel"): "self_attn.v_proj.weight",
    ("self_attn", "o_proj", "kernel"): "self_attn.o_proj.weight",
    ("mlp", "gate_proj", "kernel"): "mlp.gate_proj.weight",
    ("mlp", "up_proj", "kernel"): "mlp.up_proj.weight",
    ("mlp", "down_proj", "kernel"): "mlp.down_proj.weight",
}
# Our top-level parameter path → HF name.
TOP_KEYS: dict[tuple[str, ...], str] = {
    ("embed_tokens", "embedding"): "model.embed_tokens.weight",
    ("norm", "weight"): "model.norm.weight",
    ("lm_head", "kernel"): "lm_head.weight",
}
# Buffers some checkpoints carry that are not parameters (recomputed from the config).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


class CheckpointError(UserError):
    """A checkpoint folder that does not hold the expected Llama tensors."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one of our parameters lives in HF naming (one key per layer when stacked)."""

    path: tuple[str, ...]
    hf_keys: tuple[str, ...]
    stacked: bool
    transpose: bool


def key_map(config: LlamaConfig) -> list[TensorEntry]:
    """Every parameter of ``config``'s model with its HF key(s), in HF file order."""
    entries = [TensorEntry(("embed_tokens", "embedding"), ("model.embed_tokens.weight",),
                           False, False)]
    for sub, hf in LAYER_KEYS.items():
        keys = tuple(f"model.layers.{i}.{hf}" for i in range(config.num_hidden_layers))
        entries.append(TensorEntry(("layers", *sub), keys, True, sub[-1] == "kernel"))
    entries.append(TensorEntry(("norm", "weight"), ("model.norm.weight",), False, False))
    if not config.tie_word_embeddings:
        entries.append(TensorEntry(("lm_head", "kernel"), ("lm_head.weight",), False, True))
    return entries


# --------------------------------------------------------------------------- reading
class _Checkpoint:
    """All safetensors files of a folder, indexed by tensor name."""

    def __init__(self, folder: Path):
        self.folder = folder
        index_path = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index_path.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: unreadable index ({e!r})") from None
            files = {}
            for name in sorted(set(weight_map.values())):
                if not (folder / name).is_file():
                    raise CheckpointError(f"{index_path}: shard file {folder / name} is missing")
                files[name] = SafetensorsFile(folder / name)
            self.files = {key: files[name] for key, name in weight_map.items()}
            for key, f in self.files.items():
                if key not in f:
                    raise CheckpointError(f"{f.path}: index lists tensor {key!r} but the file "
                                          "does not contain it")
        elif single.is_file():
            f = SafetensorsFile(single)
            self.files = {key: f for key in f}
        else:
            pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(
                p.name for p in folder.glob("*.pt*"))
            hint = f" (found {', '.join(pickles)}: pickle checkpoints are never loaded)" \
                if pickles else ""
            raise CheckpointError(f"{folder}: no model.safetensors or "
                                  f"model.safetensors.index.json{hint}")

    def file_of(self, key: str) -> Path:
        return self.files[key].path

    def array(self, key: str) -> np.ndarray:
        return self.files[key].get(key)


def _hf_shape(entry: TensorEntry, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = our_shape[1:] if entry.stacked else our_shape
    return tuple(reversed(shape)) if entry.transpose else shape


def _validate_names(ckpt: _Checkpoint, entries: list[TensorEntry], tied: bool) -> None:
    expected = {k for e in entries for k in e.hf_keys}
    present = set(ckpt.files)
    missing = sorted(expected - present)
    if missing:
        raise CheckpointError(f"{ckpt.folder}: missing tensor(s) {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    for key in sorted(present - expected):
        if key.endswith(_IGNORED_SUFFIXES) or (tied and key == "lm_head.weight"):
            continue
        raise CheckpointError(f"{ckpt.file_of(key)}: unexpected tensor {key!r} for this config")


def _validate_shapes(ckpt: _Checkpoint, entries: list[TensorEntry], shapes: Mapping) -> None:
    for e in entries:
        want = _hf_shape(e, shapes[e.path])
        for key in e.hf_keys:
            got = ckpt.files[key].shape(key)
            if got != want:
                raise CheckpointError(f"{ckpt.file_of(key)}: tensor {key!r} has shape {got}, "
                                      f"config.json implies {want}")
            if not np.issubdtype(ckpt.files[key].dtype(key), np.floating) and \
                    ckpt.files[key].dtype(key).name != "bfloat16":
                raise CheckpointError(f"{ckpt.file_of(key)}: tensor {key!r} has non-float dtype "
                                      f"{ckpt.files[key].dtype(key)}")


def _open_folder(path: str | Path) -> tuple[LlamaConfig, _Checkpoint, list[TensorEntry]]:
    """Config, tensor index and key map of a Hugging Face folder, names validated."""
    folder = Path(path)
    if not folder.is_dir():
        raise InputNotFound(f"{folder}: model folder does not exist")
    config = LlamaConfig.from_hf_file(folder)
    ckpt = _Checkpoint(folder)
    entries = key_map(config)
    _validate_names(ckpt, entries, config.tie_word_embeddings)
    return config, ckpt, entries


def _checkpoint_dtype(ckpt: _Checkpoint, entries: list[TensorEntry]) -> np.dtype:
    first_key = entries[0].hf_keys[0]
    dtype = ckpt.files[first_key].dtype(first_key)
    for e in entries:
        for key in e.hf_keys:
            if ckpt.files[key].dtype(key) != dtype:
                raise CheckpointError(
                    f"{ckpt.file_of(key)}: tensor {key!r} is {ckpt.files[key].dtype(key)} while "
                    f"{first_key!r} is {dtype}; pass dtype= to cast everything to one dtype")
    return dtype


def _read_block(ckpt: _Checkpoint, entry: TensorEntry, index: tuple[slice, ...],
                dtype: np.dtype) -> np.ndarray:
    """The block ``index`` of our (stacked, transposed) layout, read from the HF tensors."""

    def one(key: str, idx: tuple[slice, ...]) -> np.ndarray:
        src = ckpt.array(key)
        block = src[tuple(reversed(idx))].T if entry.transpose else src[idx]
        return np.asarray(block, dtype=dtype)

    if not entry.stacked:
        return one(entry.hf_keys[0], index)
    layers = range(len(entry.hf_keys))[index[0]]
    return np.stack([one(entry.hf_keys[i], index[1:]) for i in layers])


def load_pretrained(
    path: str | Path,
    *,
    dtype: jnp.dtype | str | None = None,
    mesh: Mesh | None = None,
    rules: Mapping[str, MeshAxes] | None = None,
    compute_dtype: jnp.dtype | str | None = None,
    **model_kwargs,
) -> Llama:
    """Load a Hugging Face Llama folder (``config.json`` + safetensors) into :class:`Llama`.

    Args:
      path: model folder.
      dtype: parameter dtype; default: the checkpoint's own (all tensors must agree).
      mesh: place each parameter on this mesh by its logical axes (``rules``, default table);
        without a mesh everything goes to the first device.
      compute_dtype: activation dtype; default: ``dtype`` resolved as above.
      model_kwargs: passed to :class:`Llama` (``attention``, ``remat``).
    """
    config, ckpt, entries = _open_folder(path)
    param_dtype = np.dtype(dtype) if dtype is not None else _checkpoint_dtype(ckpt, entries)
    act_dtype = np.dtype(compute_dtype) if compute_dtype is not None else param_dtype
    model = nnx.eval_shape(lambda: Llama(config, param_dtype=param_dtype, dtype=act_dtype,
                                         rngs=nnx.Rngs(0), **model_kwargs))
    params = {path: var for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Param)}
    shapes = {e.path: params[e.path].value.shape for e in entries}
    _validate_shapes(ckpt, entries, shapes)
    table = dict(DEFAULT_RULES if rules is None else rules)
    for e in entries:
        var = params[e.path]
        if mesh is None:
            sharding = SingleDeviceSharding(jax.devices()[0])
        else:
            sharding = NamedSharding(mesh, logical_to_spec(var.logical_axes, table, mesh))
        var.value = jax.make_array_from_callback(
            shapes[e.path], sharding,
            lambda index, e=e: _read_block(ckpt, e, index, param_dtype),
        )
    return model


# --------------------------------------------------------------------------- writing
Fetch = Callable[[TensorEntry, int | None], np.ndarray]
"""``fetch(entry, layer)``: one parameter (``layer`` None) or one layer of a stacked parameter,
as a host array in OUR layout (kernels ``[in, out]``); the writer transposes and casts."""
Transform = Callable[[TensorEntry, int | None, np.ndarray], np.ndarray]


def param_shapes(config: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Our shape of every parameter of ``config``'s model (abstract: nothing is allocated)."""
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    return {p: tuple(v.value.shape) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}


def write_pretrained(
    config: LlamaConfig,
    path: str | Path,
    fetch: Fetch,
    *,
    dtype: jnp.dtype | str,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    write: bool = True,
) -> list[Path]:
    """Write a Hugging Face folder from ``fetch``, one tensor at a time; returns the files.

    Writes size-limited safetensors shards (+ ``model.safetensors.index.json`` when there are
    several) and ``config.json``. Host memory ≈ the largest single tensor ``fetch`` returns.
    With ``write=False`` every tensor is still fetched in the same order (so collective fetches
    stay in step across processes) but nothing is written.
    """
    folder = Path(path)
    out_dtype = np.dtype(dtype)
    shapes = param_shapes(config)
    entries = key_map(config)
    where: dict[str, tuple[TensorEntry, int | None]] = {}
    specs: list[tuple[str, tuple[int, ...], np.dtype]] = []
    for e in entries:
        shape = _hf_shape(e, shapes[e.path])
        for layer, key in enumerate(e.hf_keys):
            where[key] = (e, layer if e.stacked else None)
            specs.append((key, shape, out_dtype))

    def produce(key: str) -> np.ndarray:
        e, layer = where[key]
        tensor = np.asarray(fetch(e, layer))
        want = shapes[e.path][1:] if e.stacked else shapes[e.path]
        if tensor.shape != want:
            raise CheckpointError(f"{key}: source tensor has shape {tensor.shape}, config "
                                  f"implies {want}")
        return np.asarray(tensor.T if e.transpose else tensor, dtype=out_dtype)

    if not write:
        for key, _, _ in specs:
            produce(key)
        return []
    folder.mkdir(parents=True, exist_ok=True)
    shards = _split_shards(specs, max_shard_bytes)
    written = []
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        write_safetensors(folder / name, shard, produce)
        written.append(folder / name)
    index = folder / "model.safetensors.index.json"
    if len(shards) > 1:
        total = sum(int(np.prod(s)) * d.itemsize for _, s, d in specs)
        weight_map = {key: name for name, shard in zip(names, shards, strict=True)
                      for key, _, _ in shard}
        index.write_text(json.dumps({"metadata": {"total_size": total},
                                     "weight_map": weight_map}, indent=2) + "\n")
    elif index.exists():
        index.unlink()
    config.save_hf(folder, torch_dtype=_torch_dtype_name(out_dtype))
    return written


def model_fetch(model: Llama) -> Fetch:
    """A :data:`Fetch` over a placed model: each layer is sliced on device and copied to host.

    Arrays spread over several hosts are gathered (:func:`~basque_jax.sharding.to_host`):
    every process must then fetch the same tensors in the same order.
    """
    params = {p: v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}

    def fetch(e: TensorEntry, layer: int | None) -> np.ndarray:
        value = params[e.path].value
        part = value if layer is None else value[layer]
        return to_host(part)

    return fetch


def folder_fetch(path: str | Path) -> tuple[LlamaConfig, Fetch]:
    """The config and a :data:`Fetch` streaming a Hugging Face folder's tensors.

    Names and shapes are validated up front. Tensors are read (not memory-mapped), one per call,
    so resident memory stays at about one tensor whatever the checkpoint size.
    """
    config, ckpt, entries = _open_folder(path)
    _validate_shapes(ckpt, entries, param_shapes(config))

    def fetch(e: TensorEntry, layer: int | None) -> np.ndarray:
        key = e.hf_keys[0 if layer is None else layer]
        tensor = ckpt.files[key].read(key)
        return tensor.T if e.transpose else tensor

    return config, fetch


def save_pretrained(
    model: Llama,
    path: str | Path,
    *,
    dtype: jnp.dtype | str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    transform: Transform | None = None,
) -> list[Path]:
    """Write ``model`` as a Hugging Face folder; returns the safetensors files written.

    Tensors are fetched one layer at a time (host memory ≈ the largest single tensor).
    ``dtype`` defaults to the parameters' dtype. ``transform(entry, layer, tensor)`` may
    rewrite each host tensor (our layout) before it is cast and written, e.g. to fold LoRA
    adapters in per layer. Multi-host: every process must call this; process 0 writes.
    """
    params = {p: v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}
    out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(
        params[("embed_tokens", "embedding")].value.dtype)
    base = model_fetch(model)

    def fetch(e: TensorEntry, layer: int | None) -> np.ndarray:
        tensor = base(e, layer)
        return tensor if transform is None else transform(e, layer, tensor)

    return write_pretrained(model.config, path, fetch, dtype=out_dtype,
                            max_shard_bytes=max_shard_bytes, write=jax.process_index() == 0)


def _split_shards(specs, max_bytes: int) -> list[list]:
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = int(np.prod(spec[1])) * np.dtype(spec[2]).itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _torch_dtype_name(dtype: np.dtype) -> str:
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
        np.dtype(dtype).name, "float32")
