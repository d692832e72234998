"""The embedded Basque sample (``basque_jax/assets/``): offline data for the demo and tests.

Configs name these files ``@embedded/eu_sample_corpus.jsonl`` (see
:mod:`basque_jax.yaml_config`).
"""

from __future__ import annotations

import json
from typing import Any

from basque_jax.data.config import DataConfig
from basque_jax.yaml_config import EMBEDDED_DIR

EMBEDDED_CORPUS = EMBEDDED_DIR / "eu_sample_corpus.jsonl"
EMBEDDED_CHAT = EMBEDDED_DIR / "eu_sample_chat.jsonl"


def embedded_texts() -> list[str]:
    """Every text of the sample: corpus paragraphs, then chat message contents, in file order."""
    texts = [json.loads(line)["text"] for line in EMBEDDED_CORPUS.read_text().splitlines()]
    for line in EMBEDDED_CHAT.read_text().splitlines():
        texts += [m["content"] for m in json.loads(line)["messages"]]
    return texts


def embedded_data_config(**overrides: Any) -> DataConfig:
    """A small ``DataConfig`` over the embedded sample with the demo tokenizer."""
    d: dict[str, Any] = {
        "sources": [
            {"kind": "corpus", "path": str(EMBEDDED_CORPUS), "name": "sample_corpus"},
            {"kind": "chat", "path": str(EMBEDDED_CHAT), "name": "sample_chat"},
        ],
        "seq_len": 256,
        "batch_size": 4,
        "epochs": None,
        "tokenizer": "demo",
    }
    d.update(overrides)
    return DataConfig.from_dict(d)
