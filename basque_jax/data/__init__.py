"""Data pipeline (grain): sources -> tokenize/chat template -> mix -> pack -> per-host batches.

The batch contract is documented in ``basque_jax.data.batch``; the entry point is
``make_pipeline(DataConfig, tokenizer, process_index=..., process_count=...)``. Names load
lazily (worker processes and the command line do not import JAX).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BATCH_KEYS": "batch", "check_batch": "batch", "make_global_batch": "batch",
    "ChatEncoder": "chat", "DataConfig": "config", "SourceConfig": "config",
    "build_demo_tokenizer": "demo_tokenizer", "embedded_data_config": "embedded",
    "make_dataset": "pipeline", "make_pipeline": "pipeline", "pipeline_stats": "pipeline",
    "pipeline_summary": "pipeline", "DataError": "stats", "Tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer", "make_chat_encoder": "templates",
    "TemplateEncoder": "templates",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"basque_jax.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'basque_jax.data' has no attribute {name!r}")
