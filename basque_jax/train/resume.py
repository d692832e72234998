"""Resuming a run: the checkpoint's config must be the one being resumed.

A changed ``train.steps`` reshapes the learning-rate schedule, a changed data section gets
the old data position, a changed model or LoRA does not fit the saved state: every field that
decides the run's results is compared with the checkpoint's stored config, and differences are
refused in one error listing them (``train.accept_config_changes: true`` accepts them). Fields
that only change where or how fast the same run goes (mesh, logging, checkpoint cadence,
attention kernel, remat, data workers) may change freely.
"""

from __future__ import annotations

from typing import Any

from basque_jax.errors import ConfigError

COMPARED = ("model", "lora", "data", "optim", "train")
FREE = {
    "model": ("attention", "remat", "scan_unroll", "name"),
    "data": ("worker_count", "worker_buffer_size", "read_threads", "shard_records"),
    "train": ("output_dir", "log_every", "eval_every", "eval_batches", "save_every",
              "keep_checkpoints", "async_checkpoints", "progress_bar", "tensorboard",
              "accept_config_changes"),
}


def _flatten(d: Any, prefix: str) -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: d}


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: saved -> current"`` for every compared field that differs."""
    changes = []
    for section in COMPARED:
        old = _flatten(saved.get(section) or {}, section)
        new = _flatten(current.get(section) or {}, section)
        for key in sorted(set(old) | set(new)):
            field = key.split(".")[1]
            if field in FREE.get(section, ()) or old.get(key) == new.get(key):
                continue
            if isinstance(old.get(key), list | tuple) and list(old[key]) == list(new.get(key)
                                                                                  or []):
                continue
            changes.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return changes


def check_resume(saved: dict[str, Any], current: dict[str, Any], where: str,
                 accept: bool) -> list[str]:
    """ConfigError listing what differs from the checkpoint's config (unless ``accept``);
    returns the differences."""
    changes = config_changes(saved, current)
    if changes and not accept:
        raise ConfigError(f"{where}: resuming with a config that differs from the checkpoint's "
                          f"in {len(changes)} field(s): {'; '.join(changes)}. Restore the old "
                          "values, or set train.accept_config_changes=true to continue with the "
                          "new ones")
    return changes
