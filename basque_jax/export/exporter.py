"""``basque-jax export``: a run checkpoint or HF folder → a merged HF model or a PEFT adapter.

Merged export streams tensor by tensor, layer by layer, and never materialises a merged copy
of the model: each base tensor comes from its source, LoRA (when present) is folded in in
float32 for that one layer, the result is cast and appended to the current safetensors shard.

Where the base tensors come from:

* HF folder SOURCE, or the ``model.init_from`` backbone of a LoRA run: read from the
  safetensors files one tensor at a time (cast to the run's ``param_dtype`` then
  ``lora.base_dtype``, exactly as training saw them);
* full fine-tuning checkpoint: every parameter is in the checkpoint; each layer slice is read
  from it with tensorstore;
* LoRA run on a random ``model.preset`` backbone: the backbone is rebuilt (same seed) on the
  devices and fetched one layer at a time.

Host memory ≈ the largest single tensor (one layer's projection, or the embedding) whatever
the model size. Multi-host: run the command on every host; process 0 reads and writes, the
others wait (or, for a device-resident preset backbone, take part in the per-layer
``process_allgather``) — the output directory must be on storage process 0 can write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import jax
import numpy as np

from basque_jax.export.files import (
    ExportError,
    ModelFiles,
    check_out_dir,
    folder_files,
    run_files,
    staged_dir,
)
from basque_jax.export.source import CheckpointArrays
from basque_jax.model.gguf import model_path
from basque_jax.model.hf import (
    DEFAULT_MAX_SHARD_BYTES,
    Fetch,
    TensorEntry,
    folder_fetch,
    model_fetch,
    write_pretrained,
)
from basque_jax.model.lora import TARGETS
from basque_jax.model.peft_io import save_peft_adapter
from basque_jax.runs import HFSource, RunSource, resolve_source

EXPORT_DTYPES = ("bfloat16", "float32", "float16")


@dataclass
class ExportResult:
    """What an export wrote."""

    out_dir: Path
    mode: str
    source: str
    files: list[str] = field(default_factory=list)
    lora: dict | None = None


def merge_fetch(base: Fetch, adapters: dict[str, tuple[np.ndarray, np.ndarray]],
                scale: float) -> Fetch:
    """``base`` with ``W + scale * A @ B`` folded in (float32) for every adapted projection."""
    by_path = {("layers", TARGETS[t], t, "kernel"): ab for t, ab in adapters.items()}

    def fetch(e: TensorEntry, layer: int | None) -> np.ndarray:
        tensor = base(e, layer)
        ab = by_path.get(e.path)
        if ab is None:
            return tensor
        a, b = ab[0][layer], ab[1][layer]
        delta = np.matmul(a.astype(np.float32), b.astype(np.float32))
        return tensor.astype(np.float32) + np.float32(scale) * delta

    return fetch


def _cast_fetch(base: Fetch, *dtypes: str | None) -> Fetch:
    """``base`` cast through ``dtypes`` in turn (None entries skipped)."""
    chain = [np.dtype(jax.numpy.dtype(d)) for d in dtypes if d]

    def fetch(e: TensorEntry, layer: int | None) -> np.ndarray:
        tensor = base(e, layer)
        for d in chain:
            tensor = tensor.astype(d)
        return tensor

    return fetch


@dataclass
class _Plan:
    files: ModelFiles  # config, backbone, tokenizer and chat template of the export
    fetch: Fetch
    collective: bool = False  # every process must run fetch in lockstep


def _backbone_fetch(src: RunSource) -> tuple[Fetch, bool]:
    """The frozen base tensors of a LoRA run, as training held them."""
    cfg = src.config
    if cfg.model.init_from:
        folder = model_path(cfg.model.init_from)
        if not folder.is_dir():
            raise ExportError(f"{folder}: the run's backbone (model.init_from) is missing; "
                              "it holds the base weights the adapters were trained on")
        config, fetch = folder_fetch(folder)
        if config != src.model_config:
            raise ExportError(f"{folder}/config.json no longer matches the checkpoint's "
                              f"model_config ({src.checkpoint_dir}/meta)")
        return _cast_fetch(fetch, cfg.model.param_dtype, cfg.lora.base_dtype), False
    from basque_jax.runs import backbone
    from basque_jax.sharding import mesh_and_rules, use_sharding

    mesh, rules = mesh_and_rules(cfg.mesh)
    with use_sharding(mesh, rules):
        model = backbone(cfg, mesh, rules)  # same seed → the same random backbone
    return _cast_fetch(model_fetch(model), cfg.lora.base_dtype), jax.process_count() > 1


def _merged_plan(src: HFSource | RunSource) -> _Plan:
    if isinstance(src, HFSource):
        config, fetch = folder_fetch(src.folder)
        return _Plan(folder_files(src.folder, config), fetch)
    files, lora = run_files(src.config, src.model_config), src.lora
    if lora is None:  # full fine-tuning: every parameter is in the checkpoint
        arrays = CheckpointArrays(src)

        def fetch(e: TensorEntry, layer: int | None) -> np.ndarray:
            return arrays.read(arrays.param_name(e.path), () if layer is None else (layer,))

        return _Plan(files, fetch)
    adapters = CheckpointArrays(src).adapters(lora)
    base, collective = _backbone_fetch(src)
    return _Plan(files, merge_fetch(base, adapters, lora.scale), collective)


def export(
    source: str | Path,
    out_dir: str | Path,
    *,
    mode: Literal["merged", "peft"] = "merged",
    dtype: str = "bfloat16",
    overwrite: bool = False,
    step: int | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> ExportResult:
    """Export ``source`` (see :func:`resolve_source`) into ``out_dir``.

    ``mode="merged"``: a Hugging Face model folder (LoRA folded in, weights in ``dtype``).
    ``mode="peft"``: the LoRA adapters as a PEFT folder (float32, rank/alpha/targets from the
    checkpoint metadata). Errors (:class:`ExportError`, ``SourceError``) leave ``out_dir`` as it
    was.
    """
    if mode not in ("merged", "peft"):
        raise ExportError(f"unknown export mode {mode!r}; choose merged or peft")
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    src = resolve_source(source, step)
    out = Path(out_dir)
    protected = [src.folder] if isinstance(src, HFSource) else [src.run_dir]
    if isinstance(src, RunSource) and src.config.model.init_from:
        protected.append(model_path(src.config.model.init_from))
    check_out_dir(out, overwrite, protected)
    writer = jax.process_index() == 0
    result = ExportResult(out, mode, src.name)

    if mode == "peft":
        lora = None if isinstance(src, HFSource) else src.lora
        if lora is None:
            what = "a Hugging Face folder" if isinstance(src, HFSource) else \
                "a full fine-tuning checkpoint"
            raise ExportError(f"{src.name}: --peft needs LoRA adapters but SOURCE is {what}; "
                              "export it with --merged")
        result.lora = lora.to_metadata()
        if writer:
            adapters = CheckpointArrays(src).adapters(lora)
            with staged_dir(out) as tmp:
                files = save_peft_adapter(tmp, lora, adapters, base_model=lora.base_model)
            result.files = [f.name for f in files]
        _sync("peft export")
        return result

    plan = _merged_plan(src)
    if not isinstance(src, HFSource):
        result.lora = src.meta.get("lora")
    if writer:
        with staged_dir(out) as tmp:
            files = write_pretrained(plan.files.config, tmp, plan.fetch, dtype=dtype,
                                     max_shard_bytes=max_shard_bytes)
            names = [f.name for f in files] + [p.name for p in tmp.glob("*.json")
                                               if p.name.startswith(("config", "model"))]
            names += plan.files.write(tmp)
        result.files = sorted(set(names))
    elif plan.collective:
        write_pretrained(plan.files.config, out, plan.fetch, dtype=dtype, write=False)
    _sync("merged export")
    return result


def _sync(what: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"basque-jax {what} done")
