"""Decoding with a KV cache: the model's own modules, laid out for one token at a time.

``Llama.__call__`` (training, scoring) scans over stacked layer weights; on a one-token step
XLA would then copy every layer's weight slice and a stacked cache each step (measured: most of
a CPU decode step). Here the same modules (embedding, RMSNorms, the q/k/v/o and MLP projections
with their LoRA adapters, rotary tables, the output head) run over a Python list of per-layer
parameter states, against a :class:`SlotCache` held per layer (keys ``[batch, kv, head_dim,
len]``, values ``[batch, kv, len, head_dim]``) so each step writes one slot in place and both
attention matmuls read the cache without transposing it. Masking and attention math are the
training forward's (:class:`~basque_jax.model.attention.AttentionMask`,
:func:`~basque_jax.model.attention.cached_attention`).

New tokens are written at each row's ``end`` slot with their segment ids; a query attends to
filled slots (same non-zero segment id) at or before its own slot; ``end`` advances by the
number of non-padding tokens. Rows are independent, so a finished row can be reset and refilled
without touching the others. Per-layer weights come either from a compiled copy made when the
weights change (:func:`make_unstacker`, fastest on CPU, where adapter-free layers also get their
q/k/v and gate/up kernels fused into one matmul each) or from static slices of the stacked
weights inside the compiled program (:func:`slice_layers`, no extra memory).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from basque_jax.model.attention import AttentionMask, cached_attention
from basque_jax.model.config import LlamaConfig
from basque_jax.model.llama import Llama
from basque_jax.model.precision import matmul
from basque_jax.model.rope import apply_rope, inverse_frequencies, rope_tables
from basque_jax.sharding import constrain


class SlotCache(NamedTuple):
    """Per-layer keys ``[batch, kv_heads, head_dim, max_len]`` (stored transposed) and values
    ``[batch, kv_heads, max_len, head_dim]``, filled-slot segment ids ``[batch, max_len]``
    (0 = empty) and each row's next free slot ``end [batch]``."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    segment_ids: jax.Array
    end: jax.Array

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]


def init_slot_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any) -> SlotCache:
    """An empty cache (call inside ``jax.jit`` with output shardings to place it)."""
    kv, d = config.num_key_value_heads, config.resolved_head_dim
    layers = range(config.num_hidden_layers)
    return SlotCache(tuple(jnp.zeros((batch, kv, d, max_len), dtype) for _ in layers),
                     tuple(jnp.zeros((batch, kv, max_len, d), dtype) for _ in layers),
                     jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((batch,), jnp.int32))


CACHE_K_AXES = ("batch", "act_kv_heads", "head_dim", "cache_sequence")
CACHE_V_AXES = ("batch", "act_kv_heads", "cache_sequence", "head_dim")


class Fused(NamedTuple):
    """One layer's input projections as single matmuls: ``[q|k|v]`` and ``[gate|up]``."""

    qkv: jax.Array
    gate_up: jax.Array


def slice_layers(stacked: nnx.State, n: int) -> list[nnx.State]:
    """Per-layer states by static slicing (inside a compiled program: no persistent copy)."""
    return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)]


def layer_modules(model: Llama) -> list[nnx.Module]:
    """The model's decoder layers as modules over static slices of the stacked weights."""
    graphdef, stacked = nnx.split(model.layers)
    return [nnx.merge(graphdef, s) for s in slice_layers(stacked, model.config.num_hidden_layers)]


def fuse_layer(layer: nnx.Module) -> Fused:
    """Concatenated q/k/v and gate/up kernels of one (unstacked, adapter-free) layer."""
    a, m = layer.self_attn, layer.mlp
    return Fused(jnp.concatenate([a.q_proj.kernel[...], a.k_proj.kernel[...],
                                  a.v_proj.kernel[...]], axis=-1),
                 jnp.concatenate([m.gate_proj.kernel[...], m.up_proj.kernel[...]], axis=-1))


def make_unstacker(graphdef: nnx.GraphDef, stacked: nnx.State, n: int, *, fuse: bool
                   ) -> Callable[[nnx.State], tuple[list[nnx.State], list[Fused] | None]]:
    """A compiled ``stacked -> (per-layer states, fused projections or None)`` for states
    shaped and placed like ``stacked``: per-layer copies of the stacked layer weights, each
    keeping its sharding minus the leading ``layers`` axis (the layers' memory once more;
    twice with ``fuse``). Build once, call on every weight update."""

    def drop_lead(x: jax.Array) -> Any:
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding):
            return NamedSharding(s.mesh, PartitionSpec(*tuple(s.spec)[1:]))
        return s

    def split(stacked: nnx.State):
        layers = slice_layers(stacked, n)
        fused = [fuse_layer(nnx.merge(graphdef, s)) for s in layers] if fuse else None
        return layers, fused

    shardings = [jax.tree.map(drop_lead, stacked) for _ in range(n)]
    if any(s is None for s in jax.tree.leaves(shardings[0], is_leaf=lambda v: v is None)):
        return jax.jit(split)
    fused_sh = [Fused(None, None)] * n if fuse else None  # type: ignore[arg-type]
    return jax.jit(split, out_shardings=(shardings, fused_sh))


def _write(buffer: jax.Array, update: jax.Array, start: jax.Array, axis: int) -> jax.Array:
    """Write ``update`` into ``buffer`` along ``axis`` (of each row) at per-row ``start``."""

    def one(buf, upd, s):
        index = [0] * buf.ndim
        index[axis - 1] = s
        return jax.lax.dynamic_update_slice(buf, upd, tuple(index))

    return jax.vmap(one)(buffer, update, start)


def _mlp(mlp: nnx.Module, x: jax.Array, fused: Fused | None, dtype: Any) -> jax.Array:
    """The layer's SwiGLU MLP, with gate and up in one matmul when ``fused`` is given."""
    if fused is None:
        return mlp(x)
    gate, up = jnp.split(matmul(x, fused.gate_up, dtype), 2, axis=-1)
    return mlp.down_proj(constrain(jax.nn.silu(gate) * up, ("batch", "sequence", "act_mlp")))


def forward(model: Llama, layers: Sequence[nnx.Module], tokens: jax.Array,
            positions: jax.Array, segment_ids: jax.Array, cache: SlotCache,
            fused: Sequence[Fused] | None = None) -> tuple[jax.Array, SlotCache]:
    """Final normalised hidden states ``[b, t, hidden]`` of ``tokens`` and the updated cache.

    ``layers``: one ``DecoderLayer`` per layer (unstacked weights); ``fused``: their fused
    projections (adapter-free layers only), used instead of the separate q/k/v and gate/up
    matmuls. Apply ``model.logits`` to the positions you need (the sampler only needs each
    row's last one).
    """
    cfg = model.config
    b, t = tokens.shape
    start = cache.end
    slots = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    seg = segment_ids.astype(jnp.int32)
    kv_seg = _write(cache.segment_ids, seg, start, 1)
    kv_slots = jnp.broadcast_to(jnp.arange(cache.max_len, dtype=jnp.int32), (b, cache.max_len))
    mask = AttentionMask(slots, kv_slots, seg, kv_seg)
    cos, sin = rope_tables(positions.astype(jnp.int32), inverse_frequencies(cfg))
    hd, nh, nkv = cfg.resolved_head_dim, cfg.num_attention_heads, cfg.num_key_value_heads

    x = constrain(model.embed_tokens(tokens).astype(model.dtype), ("batch", "sequence",
                                                                    "act_embed"))
    new_k, new_v = [], []
    fused = [None] * len(layers) if fused is None else fused
    for layer, f, k_cache, v_cache in zip(layers, fused, cache.k, cache.v, strict=True):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        if f is None:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        else:
            q, k, v = jnp.split(matmul(h, f.qkv, model.dtype), [nh * hd, (nh + nkv) * hd],
                                axis=-1)
        q = apply_rope(q.reshape(b, t, nh, hd), cos, sin)
        k = apply_rope(k.reshape(b, t, nkv, hd), cos, sin)
        v = v.reshape(b, t, nkv, hd)
        q = constrain(q, ("batch", "sequence", "act_heads", "head_dim"))
        k_cache = _write(k_cache, k.transpose(0, 2, 3, 1).astype(k_cache.dtype), start, 3)
        v_cache = _write(v_cache, jnp.swapaxes(v, 1, 2).astype(v_cache.dtype), start, 2)
        k_cache = constrain(k_cache, CACHE_K_AXES)
        v_cache = constrain(v_cache, CACHE_V_AXES)
        out = cached_attention(q, k_cache, v_cache, mask)
        out = constrain(out, ("batch", "sequence", "act_heads", "head_dim"))
        x = x + attn.o_proj(out.reshape(b, t, nh * hd))
        x = x + _mlp(layer.mlp, layer.post_attention_layernorm(x), f, model.dtype)
        x = constrain(x, ("batch", "sequence", "act_embed"))
        new_k.append(k_cache)
        new_v.append(v_cache)
    end = start + jnp.sum(seg != 0, axis=-1, dtype=jnp.int32)
    return model.norm(x), SlotCache(tuple(new_k), tuple(new_v), kv_seg, end)


def decode_step(model: Llama, tokens: jax.Array, cache: SlotCache, *,
                positions: jax.Array | None = None, segment_ids: jax.Array | None = None
                ) -> tuple[jax.Array, SlotCache]:
    """Logits ``[b, t, vocab]`` of ``tokens`` written after each row's cached ones, and the
    updated cache (positions default to the slots, segments to 1): the one-call form of
    :func:`forward` (layers sliced from the stacked weights)."""
    b, t = tokens.shape
    slots = cache.end[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    positions = slots if positions is None else positions
    segment_ids = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
    hidden, cache = forward(model, layer_modules(model), tokens, positions, segment_ids, cache)
    return model.logits(hidden), cache
