"""AdamW with linear warmup and cosine decay to a floor, as the Latxa Instruct recipe runs it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


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


def make_optimizer(*, lr: float, total_steps: int, warmup_ratio: float, min_lr_ratio: float,
                   b1: float, b2: float, eps: float, weight_decay: float,
                   clip_norm: float | None) -> tuple[optax.GradientTransformation,
                                                     optax.Schedule]:
    """The optimizer chain (clip → AdamW) and its learning-rate schedule."""
    schedule = lr_schedule(lr, total_steps, warmup_ratio, min_lr_ratio)
    parts = [] if clip_norm is None else [optax.clip_by_global_norm(clip_norm)]
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts), schedule
