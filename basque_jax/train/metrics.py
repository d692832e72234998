"""Metrics sinks: JSON lines (always) and TensorBoard (optional), written by process 0 only.

The directory may be local or a ``gs://`` URI (see :mod:`basque_jax.jsonl_log`).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
from etils import epath

from basque_jax.jsonl_log import JsonlLog


class MetricsWriter:
    """Append ``{"step", "time", **metrics}`` records to ``metrics.jsonl`` (+ TensorBoard)."""

    def __init__(self, directory: str | os.PathLike, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.log = JsonlLog(epath.Path(directory) / "metrics.jsonl")
        self._tb = None
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.fspath(epath.Path(directory) / "tensorboard"))

    @property
    def path(self) -> epath.Path:
        return self.log.path

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(),
                  **{k: float(v) if hasattr(v, "__float__") else v for k, v in metrics.items()}}
        self.log.append([record])
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, float):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
