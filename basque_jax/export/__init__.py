"""Export to Hugging Face: merged models and PEFT adapters (see :mod:`.exporter`).

Light on import (the CLI builds its parser from here); the API loads on first use.
"""

from __future__ import annotations

from typing import Any

_API = {
    "export": "basque_jax.export.exporter", "ExportResult": "basque_jax.export.exporter",
    "ExportError": "basque_jax.export.files", "resolve_source": "basque_jax.runs",
    "HFSource": "basque_jax.runs", "RunSource": "basque_jax.runs",
    "SourceError": "basque_jax.runs",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'basque_jax.export' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_API[name]), name)
