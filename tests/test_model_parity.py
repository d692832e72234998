"""Logit parity with transformers' PyTorch LlamaForCausalLM on random weights."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import HF_CASES
from transformers import LlamaForCausalLM

from basque_jax import load_pretrained


def _batch(vocab: int, seed: int = 1, length: int = 64):
    """Batch 2 × ``length`` tokens; the second row is right-padded after 64% of them."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(2, length)).astype(np.int32)
    mask = np.ones((2, length), np.int32)
    mask[1, length * 41 // 64:] = 0
    return ids, mask


def _hf_logits(folder, ids, mask) -> np.ndarray:
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long))
    return out.logits.float().numpy()


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_float32_logits_match_transformers(hf_checkpoint, case):
    folder = hf_checkpoint(case)
    ids, mask = _batch(HF_CASES[case]["vocab_size"])
    ref = _hf_logits(folder, ids, mask)
    model = load_pretrained(folder, attention="xla")
    ours = np.asarray(model(jnp.asarray(ids), segment_ids=jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(ref).max() > 1.0, "logits too small for a meaningful comparison"
    np.testing.assert_array_less(np.abs(ours - ref)[real].max(), 1e-4)


def test_long_rows_match_transformers(hf_checkpoint):
    """512-token rows: the XLA attention runs in causal query blocks (4 of 128 here)."""
    from basque_jax.model.attention import causal_query_blocks

    assert causal_query_blocks(512) == 4
    folder = hf_checkpoint("llama31")
    ids, mask = _batch(HF_CASES["llama31"]["vocab_size"], seed=2, length=512)
    ref = _hf_logits(folder, ids, mask)
    ours = np.asarray(load_pretrained(folder, attention="xla")(
        jnp.asarray(ids), segment_ids=jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_array_less(np.abs(ours - ref)[real].max(), 1e-4)


def test_bfloat16_compute_within_tolerance(hf_checkpoint):
    """bf16 compute vs HF float32: max |Δ| ≤ 0.15 and mean |Δ| ≤ 0.02 on O(1..10) logits."""
    folder = hf_checkpoint("llama31")
    ids, mask = _batch(256)
    ref = _hf_logits(folder, ids, mask)
    model = load_pretrained(folder, compute_dtype=jnp.bfloat16, attention="xla")
    ours = np.asarray(model(jnp.asarray(ids), segment_ids=jnp.asarray(mask)).astype(jnp.float32))
    diff = np.abs(ours - ref)[mask.astype(bool)]
    assert diff.max() <= 0.15, diff.max()
    assert diff.mean() <= 0.02, diff.mean()


def test_bfloat16_params_load_and_run(hf_checkpoint):
    folder = hf_checkpoint("llama32_tied")
    model = load_pretrained(folder, dtype=jnp.bfloat16)
    assert model.embed_tokens.embedding.value.dtype == jnp.bfloat16
    out = model(jnp.ones((1, 8), jnp.int32))
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())
