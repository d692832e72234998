"""The ``jax.nn.dot_product_attention`` path (``cudnn`` on GPU; its XLA reference here):
plain causal attention for one-document rows, the dense segment mask otherwise, both against
torch's ``scaled_dot_product_attention`` (an independent reference) and the branch choice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from basque_jax.model.attention import AttentionMask, nn_attention, one_document_rows

B, T, H, KV, D = 2, 64, 4, 2, 16


def _mask(seg: np.ndarray) -> AttentionMask:
    slots = jnp.broadcast_to(jnp.arange(seg.shape[1]), seg.shape)
    seg = jnp.asarray(seg, jnp.int32)
    return AttentionMask(slots, slots, seg, seg)


def _qkv(seed: int = 0):
    r = np.random.default_rng(seed)
    return tuple(r.normal(size=s).astype(np.float32)
                 for s in ((B, T, H, D), (B, T, KV, D), (B, T, KV, D), (B, T, H, D)))


def _torch_reference(q, k, v, w, seg):
    """Loss sum(out * w) and its gradients from torch SDPA with an explicit boolean mask."""
    tq, tk, tv = (torch.tensor(x.transpose(0, 2, 1, 3), requires_grad=True) for x in (q, k, v))
    s = torch.tensor(seg)
    idx = torch.arange(T)
    allowed = (idx[None, :, None] >= idx[None, None, :]) & (s[:, :, None] == s[:, None, :])
    allowed &= (s[:, None, :] != 0) | (s[:, :, None] == 0)
    out = torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, attn_mask=allowed[:, None], enable_gqa=True)
    loss = (out.transpose(1, 2) * torch.tensor(w)).sum()
    loss.backward()
    grads = [x.grad.numpy().transpose(0, 2, 1, 3) for x in (tq, tk, tv)]
    return loss.item(), grads


SEGMENTS = {
    "one_document": np.ones((B, T), np.int32),
    "one_document_other_id": np.full((B, T), 3, np.int32),
    "packed_and_padded": np.repeat([[1, 2, 3, 0]], T // 4, axis=1).repeat(B, axis=0),
    "padded_tail": np.concatenate([np.ones((B, T - 8)), np.zeros((B, 8))], 1).astype(np.int32),
}


@jax.jit
def _value_and_grads(q, k, v, w, seg):
    """One compiled program for every case (the masks are arguments, both branches inside)."""
    def loss(q, k, v):
        return jnp.sum(nn_attention(q, k, v, _mask(seg), backend="xla") * w)

    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("case", sorted(SEGMENTS))
def test_values_and_gradients_match_torch_sdpa(case):
    seg = SEGMENTS[case]
    q, k, v, w = _qkv()
    value, grads = _value_and_grads(q, k, v, w, seg)
    ref_value, ref_grads = _torch_reference(q, k, v, w, seg)
    np.testing.assert_allclose(value, ref_value, rtol=1e-4, atol=1e-3)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_branch_choice():
    expected = {"one_document": True, "one_document_other_id": True,
                "packed_and_padded": False, "padded_tail": False}
    for case, seg in SEGMENTS.items():
        assert bool(one_document_rows(_mask(seg))) is expected[case], case
    mixed = np.stack([SEGMENTS["one_document"][0], SEGMENTS["packed_and_padded"][0]])
    assert not bool(one_document_rows(_mask(mixed)))  # one packed row: the whole batch masks
