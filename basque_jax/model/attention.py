"""Attention kernels behind one signature: reference XLA, ``jax.nn.dot_product_attention``
(cuDNN on GPU) and Pallas splash attention (TPU; CPU in interpret mode).

All take ``q [batch, q_len, heads, head_dim]``, ``k``/``v [batch, kv_len, kv_heads, head_dim]``
and a :class:`AttentionMask` built from slot indices and segment ids: a query attends to a key
iff the key's slot is not after the query's and both carry the same non-zero segment id. Packed
documents therefore never see each other, and padding (segment 0) is never attended by real tokens.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "dot_product", "cudnn", "splash", "splash_interpret")


class AttentionMask(NamedTuple):
    """Slot indices and segment ids of queries and keys, ``[batch, len]`` each."""

    q_slots: jax.Array
    kv_slots: jax.Array
    q_segments: jax.Array
    kv_segments: jax.Array

    def dense(self) -> jax.Array:
        """Boolean mask ``[batch, q_len, kv_len]``."""
        causal = self.kv_slots[:, None, :] <= self.q_slots[:, :, None]
        same = self.q_segments[:, :, None] == self.kv_segments[:, None, :]
        real = self.kv_segments[:, None, :] != 0
        # Padding queries (segment 0) may attend to other padding: rows never go empty.
        return causal & same & (real | (self.q_segments[:, :, None] == 0))


def resolve_implementation(name: str) -> str:
    """Map ``auto`` to the best kernel for the default backend."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {name!r}; choose from {IMPLEMENTATIONS}"
        )
    if name != "auto":
        return name
    backend = jax.default_backend()
    return {"tpu": "splash", "gpu": "cudnn"}.get(backend, "xla")


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, implementation: str = "xla"
) -> jax.Array:
    """Scaled dot-product attention with grouped-query heads; returns ``[b, q_len, heads, d]``."""
    impl = resolve_implementation(implementation)
    if impl in ("splash", "splash_interpret"):
        if q.shape[1] != k.shape[1]:  # decode / cache steps: the kernel wants square blocks
            impl = "xla"
        else:
            return splash_attention(q, k, v, mask, interpret=impl == "splash_interpret")
    if impl in ("dot_product", "cudnn"):
        groups = q.shape[2] // k.shape[2]
        k_rep = jnp.repeat(k, groups, axis=2) if impl == "dot_product" else k
        v_rep = jnp.repeat(v, groups, axis=2) if impl == "dot_product" else v
        return jax.nn.dot_product_attention(
            q, k_rep, v_rep, mask=mask.dense()[:, None], implementation=(
                "cudnn" if impl == "cudnn" else "xla"
            ),
        )
    return xla_attention(q, k, v, mask)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask) -> jax.Array:
    """Reference implementation: logits and softmax in float32, GQA by grouping query heads.

    Laid out as batched matmuls ``[b, kv_heads, group * q_len, d] @ [b, kv_heads, d, kv_len]``,
    which XLA's CPU and GPU backends run markedly faster than the 5-d einsum.
    """
    b, t, h, d = q.shape
    kv_heads, s = k.shape[2], k.shape[1]
    g = h // kv_heads
    qh = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, d)
    kh = k.transpose(0, 2, 3, 1)  # [b, kv, d, s]
    vh = v.transpose(0, 2, 1, 3)  # [b, kv, s, d]
    logits = jnp.matmul(qh, kh, preferred_element_type=jnp.float32) * (d**-0.5)
    logits = logits.reshape(b, kv_heads, g, t, s)
    logits = jnp.where(mask.dense()[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, kv_heads, g * t, s)
    out = jnp.matmul(probs, vh).reshape(b, kv_heads, g, t, d)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def splash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, interpret: bool = False
) -> jax.Array:
    """Pallas splash attention (causal + segment ids), vmapped over the batch.

    Assumes slots are ``0..len-1`` in every row (training and prefill from an empty cache).
    Inside :func:`basque_jax.sharding.use_sharding` the kernel runs per shard under
    ``shard_map`` (a Pallas call cannot be partitioned by the compiler): rows split over the
    batch axes, heads over the tensor axis; the sequence must not be sharded.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )

    from basque_jax.sharding import current_sharding

    b, t, h, d = q.shape
    block = _splash_block(t)
    scale = d**-0.5
    qh = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)  # [b, h, t, d]
    kh = jnp.swapaxes(k, 1, 2)
    vh = jnp.swapaxes(v, 1, 2)
    ctx = current_sharding()
    if ctx is None:
        kernel = _splash_kernel(t, h, block, interpret)
        seg = sk.SegmentIds(q=mask.q_segments, kv=mask.kv_segments)
        return jnp.swapaxes(jax.vmap(kernel)(qh, kh, vh, segment_ids=seg), 1, 2)

    q_spec = ctx.spec(("batch", "act_heads", "sequence", "head_dim"))
    kv_spec = ctx.spec(("batch", "act_kv_heads", "sequence", "head_dim"))
    seg_spec = ctx.spec(("batch", "sequence"))
    if q_spec[2] is not None or q_spec[3] is not None:
        raise ValueError(f"splash attention cannot shard the sequence or head_dim axes "
                         f"(spec {q_spec}); map logical axes 'sequence'/'head_dim' to None")
    head_shards = _spec_size(ctx.mesh, q_spec[1])
    if h % head_shards or k.shape[2] % _spec_size(ctx.mesh, kv_spec[1]):
        raise ValueError(f"{h} query / {k.shape[2]} KV heads do not split over "
                         f"{head_shards} tensor shards")
    kernel = _splash_kernel(t, h // head_shards, block, interpret)

    def local(qh, kh, vh, q_seg, kv_seg):
        seg = sk.SegmentIds(q=q_seg, kv=kv_seg)
        return jax.vmap(kernel)(qh, kh, vh, segment_ids=seg)

    out = jax.shard_map(local, mesh=ctx.mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec,
                                                        seg_spec),
                        out_specs=q_spec, check_vma=False)(qh, kh, vh, mask.q_segments,
                                                           mask.kv_segments)
    return jnp.swapaxes(out, 1, 2)


def _spec_size(mesh, entry) -> int:
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    size = 1
    for n in names:
        size *= mesh.shape[n]
    return size


def _splash_block(seq_len: int) -> int:
    for block in (512, 256, 128):
        if seq_len % block == 0:
            return block
    raise ValueError(f"splash attention needs a sequence length divisible by 128, got {seq_len}")


@functools.lru_cache(maxsize=32)
def _splash_kernel(seq_len: int, heads: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    causal = sm.MultiHeadMask([sm.CausalMask((seq_len, seq_len)) for _ in range(heads)])
    sizes = sk.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )
    return sk.make_splash_mha(
        mask=causal, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )
