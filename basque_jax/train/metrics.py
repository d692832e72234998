"""Metrics sinks: JSON lines (always) and TensorBoard (optional), written by process 0 only.

The directory may be local or a ``gs://`` URI (``etils.epath``; object stores cannot append, so
there the whole ``metrics.jsonl`` is rewritten on each write: it is a few kB).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
from etils import epath


class MetricsWriter:
    """Append ``{"step", "time", **metrics}`` records to ``metrics.jsonl`` (+ TensorBoard)."""

    def __init__(self, directory: str | os.PathLike, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = epath.Path(directory) / "metrics.jsonl"
        self.remote = "://" in os.fspath(directory)
        self._lines: list[str] = []
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.remote and self.path.exists():
                self._lines = self.path.read_text().splitlines(keepends=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.fspath(epath.Path(directory) / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(),
                  **{k: float(v) if hasattr(v, "__float__") else v for k, v in metrics.items()}}
        line = json.dumps(record) + "\n"
        if self.remote:
            self._lines.append(line)
            self.path.write_text("".join(self._lines))
        else:
            with self.path.open("a") as f:
                f.write(line)
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, float):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def peak_flops_per_device() -> float | None:
    """Dense bf16 peak FLOP/s of the local accelerator, when known (for MFU)."""
    kind = jax.devices()[0].device_kind.lower()
    table = {"v4": 275e12, "v5 lite": 197e12, "v5e": 197e12, "v5p": 459e12, "v6": 918e12,
             "h100": 989e12, "h200": 989e12, "a100": 312e12}
    for key, value in table.items():
        if key in kind:
            return value
    return None
