"""Sampling: the KV-cache sampler, Magpie instruction generation, translation, filters (names
load lazily, so the command line does not import JAX)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"Completion": "basque_jax.sample.sampler", "PromptTooLong": "basque_jax.sample.sampler",
            "Request": "basque_jax.sample.sampler", "Sampler": "basque_jax.sample.sampler",
            "SamplerConfig": "basque_jax.sample.sampler",
            "SamplingParams": "basque_jax.sample.sampling"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'basque_jax.sample' has no attribute {name!r}")
