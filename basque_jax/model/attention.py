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

from basque_jax.model.precision import at_precision_of, matmul_precision

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
    q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, implementation: str = "xla",
) -> jax.Array:
    """Scaled dot-product attention with grouped-query heads; returns ``[b, len, heads, d]``.

    Queries and keys are the same slots ``0..len-1`` of every row (the model's forward), so a
    block of queries needs only the keys up to its end; the XLA kernel skips the blocks above
    the diagonal. Decoding against a cache uses :func:`cached_attention`.
    """
    impl = resolve_implementation(implementation)
    if impl in ("splash", "splash_interpret"):
        splash = functools.partial(splash_attention, mask=mask,
                                   interpret=impl == "splash_interpret")
        return at_precision_of(q.dtype, splash)(q, k, v)
    if impl in ("dot_product", "cudnn"):
        return nn_attention(q, k, v, mask, backend="cudnn" if impl == "cudnn" else "xla")
    return xla_attention(q, k, v, mask, query_blocks=causal_query_blocks(q.shape[1]))


def one_document_rows(mask: AttentionMask) -> jax.Array:
    """True iff every row's queries and keys carry one and the same non-zero segment id (no
    packing, no padding): the mask is then plain causal attention."""
    seg = mask.q_segments
    return jnp.all((seg == seg[:, :1]) & (seg != 0) & (mask.kv_segments == seg))


def nn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *,
                 backend: str) -> jax.Array:
    """:func:`jax.nn.dot_product_attention` (``backend`` ``cudnn``: cuDNN flash attention;
    ``xla``: its XLA reference, with K/V heads repeated). Chosen at run time: a batch of
    :func:`one_document_rows` runs with ``is_causal`` and no mask (cuDNN's causal kernel skips
    the blocks above the diagonal and reads no bias); packed or padded rows pass the dense
    ``[b, 1, q, k]`` mask (which cuDNN turns into a bias and differentiates, over every block).
    Same slot assumption as :func:`attention`."""
    if backend == "xla":
        groups = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    dpa = functools.partial(jax.nn.dot_product_attention, implementation=backend)
    causal = at_precision_of(q.dtype, functools.partial(dpa, is_causal=True))
    masked = at_precision_of(q.dtype, lambda q, k, v, allowed: dpa(q, k, v, mask=allowed))
    dense = mask.dense()[:, None]
    return jax.lax.cond(one_document_rows(mask), causal,
                        lambda q, k, v: masked(q, k, v, dense), q, k, v)


def causal_query_blocks(length: int, min_block: int = 128, max_blocks: int = 4) -> int:
    """Query blocks for causal attention over ``length`` slots: the most (up to ``max_blocks``)
    that split it evenly into blocks of at least ``min_block``; 1 for short sequences."""
    for n in range(max_blocks, 1, -1):
        if length % n == 0 and length // n >= min_block:
            return n
    return 1


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *,
                  query_blocks: int = 1) -> jax.Array:
    """Reference implementation: logits and softmax in float32, GQA by grouping query heads.

    Laid out as batched matmuls ``[b, kv_heads, group * q_len, d] @ [b, kv_heads, d, kv_len]``,
    which XLA's CPU and GPU backends run markedly faster than the 5-d einsum. With
    ``query_blocks`` > 1 (valid only when query and key slots are both ``0..len-1``), query
    block ``i`` attends to the keys of blocks ``0..i`` alone: the same values, with the
    ``(n - 1) / 2n`` of the work above the diagonal skipped.
    """
    b, t, h, d = q.shape
    kv_heads, s = k.shape[2], k.shape[1]
    g = h // kv_heads
    qh = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4)  # [b, kv, g, t, d]
    kh = k.transpose(0, 2, 3, 1)  # [b, kv, d, s]
    vh = v.transpose(0, 2, 1, 3)  # [b, kv, s, d]
    allowed = mask.dense()
    size = t // query_blocks
    outs = []
    for i in range(query_blocks):
        lo, hi = i * size, (i + 1) * size
        end = s if query_blocks == 1 else hi
        outs.append(_attend(qh[:, :, :, lo:hi], kh[..., :end], vh[:, :, :end],
                            allowed[:, lo:hi, :end]))
    out = outs[0] if query_blocks == 1 else jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def cached_attention(q: jax.Array, k_t: jax.Array, v: jax.Array, mask: AttentionMask
                     ) -> jax.Array:
    """:func:`xla_attention` over a KV cache held in decode layout: keys transposed
    ``k_t [b, kv, d, s]`` and values ``[b, kv, s, d]``, so both matmuls read the cache as
    stored (no per-step transpose). ``q [b, t, heads, d]``; returns the same shape."""
    b, t, h, d = q.shape
    kv_heads = k_t.shape[1]
    qh = q.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)
    out = _attend(qh, k_t, v, mask.dense())
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _attend(qh: jax.Array, kh: jax.Array, vh: jax.Array, allowed: jax.Array) -> jax.Array:
    """``qh [b, kv, g, t, d]`` over ``kh [b, kv, d, s]`` and ``vh [b, kv, s, d]`` where
    ``allowed [b, t, s]``; returns ``[b, kv, g, t, d]``."""
    b, kv_heads, g, t, d = qh.shape
    s = kh.shape[-1]
    wide = jnp.promote_types(qh.dtype, jnp.float32)  # float32, or float64 for a float64 model
    precision = matmul_precision(qh.dtype)
    logits = jnp.matmul(qh.reshape(b, kv_heads, g * t, d), kh, precision=precision,
                        preferred_element_type=wide) * (d**-0.5)
    logits = logits.reshape(b, kv_heads, g, t, s)
    logits = jnp.where(allowed[:, None, None], logits, jnp.finfo(wide).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(vh.dtype).reshape(b, kv_heads, g * t, s)
    return jnp.matmul(probs, vh, precision=precision).reshape(b, kv_heads, g, t, d)


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

    from basque_jax.sharding import current_sharding, mesh_size

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
    head_shards = mesh_size(ctx.mesh, q_spec[1])
    if h % head_shards or k.shape[2] % mesh_size(ctx.mesh, kv_spec[1]):
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
    # Cached across calls, and first built wherever a trace asks for it (under jit, inside
    # a custom_vjp): its mask tables must be concrete arrays, not that trace's tracers.
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mha(
            mask=causal, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
        )
