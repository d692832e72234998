"""Data pipeline (grain): sources -> tokenize/chat template -> mix -> pack -> per-host batches.

The batch contract is documented in ``basque_jax.data.batch``; the entry point is
``make_pipeline(DataConfig, tokenizer, process_index=..., process_count=...)``.
"""

from basque_jax.data.batch import BATCH_KEYS, check_batch, make_global_batch
from basque_jax.data.chat import ChatEncoder
from basque_jax.data.config import DataConfig, SourceConfig
from basque_jax.data.demo_tokenizer import build_demo_tokenizer
from basque_jax.data.embedded import embedded_data_config
from basque_jax.data.pipeline import (
    make_dataset,
    make_pipeline,
    pipeline_stats,
    pipeline_summary,
)
from basque_jax.data.stats import DataError
from basque_jax.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "BATCH_KEYS",
    "ChatEncoder",
    "DataConfig",
    "DataError",
    "SourceConfig",
    "Tokenizer",
    "build_demo_tokenizer",
    "check_batch",
    "load_tokenizer",
    "make_dataset",
    "make_global_batch",
    "make_pipeline",
    "pipeline_stats",
    "pipeline_summary",
    "embedded_data_config",
]
