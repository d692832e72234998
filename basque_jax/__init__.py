"""basque_jax: teach Llama 3.x a low-resource language (Basque first) with JAX on TPU pods.

Top-level names load lazily, so light modules (the data pipeline's worker processes) do not pay
for importing the model stack.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Llama": "basque_jax.model.llama",
    "LlamaConfig": "basque_jax.model.config",
    "load_model": "basque_jax.runs",
    "load_pretrained": "basque_jax.model.hf",
    "save_pretrained": "basque_jax.model.hf",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'basque_jax' has no attribute {name!r}")
