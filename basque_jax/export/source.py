"""What an export or an evaluation reads: a training run's checkpoint, or a Hugging Face folder.

``resolve_source(path, step)`` accepts a training output directory (its ``checkpoints/``
latest step, or ``step``), ``DIR/checkpoints`` or ``DIR/checkpoints/STEP``, or a Hugging Face
model folder (``config.json`` + safetensors). A run checkpoint carries its :class:`RunConfig`,
the model's HF config and the LoRA metadata (``Checkpointer.read_meta``), so nothing about the
model is re-typed by hand.

:class:`CheckpointArrays` reads the saved train-state arrays by name with tensorstore, one
slice at a time (``read(name, (layer,))``), without building the model or the optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from basque_jax.config import RunConfig
from basque_jax.model.config import LlamaConfig
from basque_jax.model.lora import TARGETS, LoraConfig


class SourceError(ValueError):
    """SOURCE is neither a usable training checkpoint nor a Hugging Face folder."""


@dataclass(frozen=True)
class HFSource:
    """A Hugging Face model folder."""

    folder: Path

    @property
    def name(self) -> str:
        return str(self.folder)


@dataclass(frozen=True)
class RunSource:
    """One step of a training run: ``<run_dir>/checkpoints/<step>``."""

    run_dir: Path
    step: int
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.run_dir}/checkpoints/{self.step}"

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints" / str(self.step)

    @property
    def config(self) -> RunConfig:
        return RunConfig.from_dict(self.meta["config"])

    @property
    def model_config(self) -> LlamaConfig:
        return LlamaConfig.from_hf_dict(self.meta["model_config"],
                                        source=f"{self.checkpoint_dir}/meta model_config")

    @property
    def lora(self) -> LoraConfig | None:
        """The adapters' config from the checkpoint metadata (None: full fine-tuning)."""
        d = self.meta.get("lora")
        return None if d is None else LoraConfig.from_metadata(d)


def resolve_source(source: str | Path, step: int | None = None) -> HFSource | RunSource:
    """Classify ``source`` (see module docstring); raises :class:`SourceError` naming it."""
    p = Path(source)
    if p.name.isdigit() and p.parent.name == "checkpoints":
        if step is not None and step != int(p.name):
            raise SourceError(f"{p}: names step {p.name} but --step {step} was given")
        return _run_source(p.parent.parent, int(p.name))
    if not p.exists():
        raise SourceError(f"{p}: SOURCE does not exist")
    if not p.is_dir():
        raise SourceError(f"{p}: SOURCE must be a directory (training output, checkpoint step "
                          "or Hugging Face model folder)")
    if (p / "checkpoints").is_dir():
        return _run_source(p, step)
    if p.name == "checkpoints" and not (p / "config.json").exists():
        return _run_source(p.parent, step)
    if (p / "config.json").is_file():
        if step is not None:
            raise SourceError(f"{p}: --step applies to training checkpoints, not to a Hugging "
                              "Face folder")
        return HFSource(p)
    raise SourceError(f"{p}: neither a training output directory (no checkpoints/) nor a "
                      "Hugging Face model folder (no config.json)")


def _run_source(run_dir: Path, step: int | None) -> RunSource:
    from basque_jax.train.checkpoint import Checkpointer

    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise SourceError(f"{ckpt_dir}: no checkpoints directory")
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    try:
        steps = sorted(ckpt.manager.all_steps())
        if not steps:
            raise SourceError(f"{ckpt_dir}: no complete checkpoint")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise SourceError(f"{ckpt_dir}: no checkpoint for step {step} (available: "
                              f"{', '.join(map(str, steps))})")
        meta = ckpt.read_meta(step)
    finally:
        ckpt.close()
    for key in ("config", "model_config"):
        if key not in meta:
            raise SourceError(f"{ckpt_dir}/{step}/meta: missing {key!r} (not a basque-jax run?)")
    return RunSource(run_dir, int(step), meta)


class CheckpointArrays:
    """The train-state arrays of one checkpoint step, read by name and index (tensorstore)."""

    def __init__(self, source: RunSource):
        import orbax.checkpoint as ocp
        from etils import epath

        self.directory = (source.checkpoint_dir / "state").absolute()
        if not self.directory.is_dir():
            raise SourceError(f"{self.directory}: checkpoint state is missing")
        metadata = ocp.PyTreeCheckpointer().metadata(self.directory).item_metadata
        self.names: dict[str, Any] = dict(metadata.tree)
        self._use_zarr3 = bool(metadata.use_zarr3)
        self._use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(epath.Path(self.directory))
        self._stores: dict[str, Any] = {}

    def param_name(self, path: tuple[str, ...]) -> str:
        """The saved name of trainable parameter ``path`` (``.params['layers']...``)."""
        base = ".params" + "".join(f"['{k}']" for k in path)
        for name in (base + ".value", base):
            if name in self.names:
                return name
        raise SourceError(f"{self.directory}: checkpoint has no parameter {base!r}")

    def read(self, name: str, index: tuple[int | slice, ...] = ()) -> np.ndarray:
        """``array[index]`` of the saved array ``name`` (only those bytes are read)."""
        store = self._stores.get(name)
        if store is None:
            import orbax.checkpoint as ocp
            import tensorstore as ts
            from etils import epath

            info = ocp.type_handlers.ParamInfo(name=name, parent_dir=epath.Path(self.directory),
                                               use_zarr3=self._use_zarr3)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._use_ocdbt)
            context = ocp.type_handlers.get_ts_context(use_ocdbt=self._use_ocdbt)
            store = ts.open(spec, open=True, read=True, context=context).result()
            self._stores[name] = store
        return np.asarray(store[index].read().result())

    def adapters(self, cfg: LoraConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{target: (A [L, in, r], B [L, r, out])}`` in float32."""
        out = {}
        for target in cfg.targets:
            path = ("layers", TARGETS[target], target)
            a = self.read(self.param_name((*path, "lora_a"))).astype(np.float32)
            b = self.read(self.param_name((*path, "lora_b"))).astype(np.float32)
            if a.shape[-1] != cfg.rank or b.shape[-2] != cfg.rank:
                raise SourceError(f"{self.directory}: {target} adapters {a.shape}/{b.shape} do "
                                  f"not match the metadata rank {cfg.rank}")
            out[target] = (a, b)
        return out
