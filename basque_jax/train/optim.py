"""AdamW with linear warmup and cosine decay to a floor, as the Latxa Instruct recipe runs it."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from basque_jax.errors import ConfigError


@dataclass(frozen=True)
class OptimConfig:
    """The ``optim:`` section: AdamW with warmup + cosine decay to ``min_lr_ratio * lr`` and
    global-norm clipping (defaults: the study's recipe)."""

    lr: float = 1e-5
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.33
    clip_norm: float | None = 1.0

    def __post_init__(self) -> None:
        checks = [
            (self.lr > 0, "lr", "must be > 0"),
            (0 <= self.b1 < 1, "b1", "must be in [0, 1)"),
            (0 <= self.b2 < 1, "b2", "must be in [0, 1)"),
            (self.eps > 0, "eps", "must be > 0"),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]"),
            (self.clip_norm is None or self.clip_norm > 0, "clip_norm", "must be > 0 or null"),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ConfigError(f"optim.{key}: {msg}, got {getattr(self, key)}")


def lr_schedule(peak: float, total_steps: int, warmup_ratio: float,
                min_lr_ratio: float) -> optax.Schedule:
    """Linear warmup over ``warmup_ratio * total_steps`` then cosine from ``peak`` to
    ``min_lr_ratio * peak`` at ``total_steps`` (HF ``cosine_with_min_lr`` semantics)."""
    warmup = int(round(warmup_ratio * total_steps))
    floor = min_lr_ratio * peak

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup, 1)
        progress = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
        cosine = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def decay_mask(params) -> object:
    """Weight decay everywhere except norm weights (HF Trainer's name rule: no ``*norm*``)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any("norm" in str(getattr(k, "key", getattr(k, "name", k)))
                                for k in path), params)


def make_optimizer(cfg: OptimConfig, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer chain (clip → AdamW) and its learning-rate schedule over ``total_steps``."""
    schedule = lr_schedule(cfg.lr, total_steps, cfg.warmup_ratio, cfg.min_lr_ratio)
    parts = [] if cfg.clip_norm is None else [optax.clip_by_global_norm(cfg.clip_norm)]
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule
