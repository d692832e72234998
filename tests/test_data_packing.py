"""Segments (shift, split, truncate) and packing into rows: property tests."""

from __future__ import annotations

from collections import Counter

import grain
import numpy as np
import pytest
from _data_utils import row_segments
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from basque_jax.data.batch import check_batch
from basque_jax.data.examples import make_segment, to_segments
from basque_jax.data.formats import BadRecord
from basque_jax.data.packing import pack


def segment_list(draw, seq_len: int):
    lengths = draw(st.lists(st.integers(2, seq_len + 1), min_size=1, max_size=25))
    out = []
    for n in lengths:
        ids = draw(st.lists(st.integers(1, 50_000), min_size=n, max_size=n))
        mask = [1] + draw(st.lists(st.sampled_from([0, 1]), min_size=n - 1, max_size=n - 1))
        out.append((ids, mask))
    return out


@st.composite
def packing_case(draw):
    seq_len = draw(st.integers(2, 40))
    return seq_len, draw(st.integers(1, 5)), segment_list(draw, seq_len)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packing_case())
def test_packing_keeps_every_token_once_and_is_consistent(case):
    seq_len, bins, docs = case
    segments = [make_segment(ids, mask) for ids, mask in docs]
    ds = pack(grain.MapDataset.source(segments).to_iter_dataset(), seq_len, num_bins=bins, seed=3)
    rows = list(ds)
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    check_batch(batch, seq_len)  # keys, dtypes, no row over seq_len, loss 0 on padding
    for r in range(len(rows)):
        seg, pos = batch["segment_ids"][r], batch["positions"][r]
        used = seg > 0
        n_used = int(used.sum())
        assert used[:n_used].all() and not used[n_used:].any()  # padding only at the end
        assert (batch["input_ids"][r][~used] == 0).all() and (pos[~used] == 0).all()
        ids = seg[used]
        assert ids[0] == 1 and set(np.diff(ids)) <= {0, 1}  # 1..n, contiguous, in order
        for s in np.unique(ids):
            assert (pos[seg == s] == np.arange((seg == s).sum())).all()  # per-document positions
            inp, tgt = batch["input_ids"][r][seg == s], batch["targets"][r][seg == s]
            assert (inp[1:] == tgt[:-1]).all()  # targets are the next token of the same doc
    expected = Counter((tuple(ids), tuple(float(m) for m in mask[1:])) for ids, mask in docs)
    assert Counter(row_segments(batch)) == expected  # nothing lost, nothing duplicated


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 30), st.integers(2, 200))
def test_long_documents_split_every_target_exactly_once(seq_len, n):
    ids = list(range(1, n + 1))
    segs, note = to_segments(ids, [1] * n, seq_len, split=True, overlong="truncate")
    assert all(1 <= len(s["input_ids"]) <= seq_len for s in segs)
    targets = np.concatenate([s["targets"] for s in segs])
    inputs = np.concatenate([s["input_ids"] for s in segs])
    assert targets.tolist() == ids[1:] and inputs.tolist() == ids[:-1]
    assert note == ("split" if n - 1 > seq_len else None)


def test_overlong_conversations_truncated_or_dropped():
    ids, mask = list(range(1, 21)), [0] * 5 + [1] * 15
    segs, note = to_segments(ids, mask, 8, split=False, overlong="truncate")
    assert note == "truncated" and len(segs) == 1
    assert segs[0]["input_ids"].tolist() == ids[:8] and segs[0]["targets"].tolist() == ids[1:9]
    assert segs[0]["loss_mask"].tolist() == mask[1:9]
    assert to_segments(ids, mask, 8, split=False, overlong="drop") == ([], "dropped_overlong")
    late = [0] * 15 + [1] * 5  # the answer starts after the cut: nothing left to train
    assert to_segments(ids, late, 8, split=False, overlong="truncate") == ([], "dropped_overlong")
    with pytest.raises(BadRecord, match="no trained tokens"):
        to_segments(ids, [0] * 20, 8, split=False, overlong="truncate")


def test_segment_dtypes_and_shift():
    s = make_segment([5, 6, 7], [0, 1, 1])
    assert s["input_ids"].dtype == np.int32 and s["targets"].dtype == np.int32
    assert s["loss_mask"].dtype == np.float32
    assert s["input_ids"].tolist() == [5, 6] and s["targets"].tolist() == [6, 7]
    assert s["loss_mask"].tolist() == [1.0, 1.0]
