"""Streaming reads of a run checkpoint for export, without building the model.

What SOURCE is (a training run's checkpoint or a Hugging Face folder) is decided by
:func:`basque_jax.runs.resolve_source`; a run checkpoint carries its config, the model's HF
config and the LoRA metadata, so nothing about the model is re-typed by hand.
:class:`CheckpointArrays` reads the saved train-state arrays by name with tensorstore, one
slice at a time (``read(name, (layer,))``), without building the model or the optimizer state.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from basque_jax.model.lora import TARGETS, LoraConfig
from basque_jax.runs import RunSource, SourceError


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
        self._context: Any = None

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

            if self._context is None:  # one context for every array (shared caches)
                self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self._use_ocdbt)
            info = ocp.type_handlers.ParamInfo(name=name, parent_dir=epath.Path(self.directory),
                                               use_zarr3=self._use_zarr3,
                                               ts_context=self._context)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._use_ocdbt)
            context = self._context
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
