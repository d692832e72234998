"""Helpers shared by the tests/test_data_*.py files (data pipeline)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LLAMA_TOKENIZER = SHARED_DATA / "llama3" / "tokenizer.model"
EXPECTED_TOKENS = SHARED_DATA / "llama3" / "expected_tokens.json"
JINJA = SHARED_DATA / "llama3" / "chat_template_llama31.jinja"
BHTC = SHARED_DATA / "eu" / "bhtc_news_train.jsonl"
TQA_CHAT = SHARED_DATA / "eu" / "truthfulqa_eu_chat.jsonl"


def need(*paths: Path) -> None:
    """Skips the test (with the reason) unless every path exists."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"shared test data absent: {', '.join(missing)} (see ../shared/data/README.md)")


def llama_tokenizer():
    need(LLAMA_TOKENIZER)
    from basque_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(LLAMA_TOKENIZER)  # cached per process


def write_jsonl(path: Path, rows: Iterable) -> Path:
    """Rows are dicts (dumped as JSON) or raw str/bytes lines written as they are."""
    with open(path, "wb") as f:
        for r in rows:
            if isinstance(r, dict):
                r = json.dumps(r, ensure_ascii=False)
            f.write((r.encode() if isinstance(r, str) else r) + b"\n")
    return path


def row_segments(batch: dict[str, np.ndarray]) -> list[tuple[tuple[int, ...], tuple[float, ...]]]:
    """Every packed segment of a batch as (full token sequence, loss mask of its targets)."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            m = seg == s
            tokens = tuple(batch["input_ids"][r][m]) + (int(batch["targets"][r][m][-1]),)
            out.append((tuple(int(t) for t in tokens), tuple(batch["loss_mask"][r][m].tolist())))
    return out


def segments_of(batches: Iterable[dict[str, np.ndarray]]) -> Counter:
    c: Counter = Counter()
    for b in batches:
        c.update(row_segments(b))
    return c
