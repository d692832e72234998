"""Llama 3.x model: config, NNX modules, Hugging Face weights I/O (names load lazily, so the
command line and the GGUF converter do not import JAX)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"ConfigError": "basque_jax.errors", "Llama": "basque_jax.model.llama",
            "LlamaConfig": "basque_jax.model.config", "RopeScaling": "basque_jax.model.config"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'basque_jax.model' has no attribute {name!r}")
