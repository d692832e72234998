"""The embedded Basque sample (``basque_jax/assets/``): offline data for the demo and tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from basque_jax.data.config import DataConfig

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SAMPLE_CORPUS = ASSETS / "eu_sample_corpus.jsonl"
SAMPLE_CHAT = ASSETS / "eu_sample_chat.jsonl"


def sample_texts() -> list[str]:
    """Every text of the sample: corpus paragraphs, then chat message contents, in file order."""
    texts = [json.loads(line)["text"] for line in SAMPLE_CORPUS.read_text().splitlines()]
    for line in SAMPLE_CHAT.read_text().splitlines():
        texts += [m["content"] for m in json.loads(line)["messages"]]
    return texts


def sample_data_config(**overrides: Any) -> DataConfig:
    """A small ``DataConfig`` over the embedded sample with the demo tokenizer."""
    d: dict[str, Any] = {
        "sources": [
            {"kind": "corpus", "path": str(SAMPLE_CORPUS), "name": "sample_corpus"},
            {"kind": "chat", "path": str(SAMPLE_CHAT), "name": "sample_chat"},
        ],
        "seq_len": 256,
        "batch_size": 4,
        "epochs": None,
        "tokenizer": "demo",
    }
    d.update(overrides)
    return DataConfig.from_dict(d)
