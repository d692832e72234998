"""Packed rows, KV-cache decode, attention kernels, remat and sharded placement."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from basque_jax import Llama, LlamaConfig, load_pretrained
from basque_jax.model.decode import decode_step, init_slot_cache
from basque_jax.sharding import use_sharding


@pytest.fixture(scope="module")
def tiny():
    return Llama(LlamaConfig.preset("tiny"), attention="xla", rngs=nnx.Rngs(3))


def _rand_ids(shape, vocab=512, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=shape), jnp.int32)


def test_packed_row_equals_documents_alone(tiny):
    lengths = [7, 12, 5, 8]  # 32 tokens, last 0 of padding handled below
    docs = [_rand_ids((1, n), seed=i) for i, n in enumerate(lengths)]
    pad = 4
    ids = jnp.concatenate([*docs, jnp.zeros((1, pad), jnp.int32)], axis=1)
    seg = jnp.asarray([sum(([i + 1] * n for i, n in enumerate(lengths)), []) + [0] * pad])
    pos = jnp.asarray([sum((list(range(n)) for n in lengths), []) + list(range(pad))])
    packed = tiny(ids, positions=pos, segment_ids=seg)
    start = 0
    for doc, n in zip(docs, lengths, strict=True):
        alone = tiny(doc)
        np.testing.assert_allclose(packed[:, start:start + n], alone, atol=1e-5, rtol=1e-5)
        start += n


@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
def test_kv_cache_decode_matches_full_forward(name):
    model = Llama(LlamaConfig.preset(name), attention="xla", rngs=nnx.Rngs(1))
    ids = _rand_ids((3, 20), seed=5)
    full = model(ids)
    cache = init_slot_cache(model.config, 3, 32, jnp.float32)
    prefill, cache = decode_step(model, ids[:, :8], cache)
    np.testing.assert_allclose(prefill, full[:, :8], atol=1e-5)
    step = jax.jit(lambda m, tok, c: decode_step(m, tok, c))
    for t in range(8, 20):
        logits, cache = step(model, ids[:, t:t + 1], cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)
    assert cache.end.tolist() == [20, 20, 20]


def test_cache_prompts_of_different_lengths(tiny):
    """Right-padded prompts in one prefill; each row then decodes as if alone."""
    a, b = _rand_ids((1, 9), seed=1), _rand_ids((1, 4), seed=2)
    ids = jnp.concatenate([a, jnp.pad(b, ((0, 0), (0, 5)))], axis=0)
    seg = jnp.asarray([[1] * 9, [1] * 4 + [0] * 5])
    cache = init_slot_cache(tiny.config, 2, 16, jnp.float32)
    _, cache = decode_step(tiny, ids, cache, segment_ids=seg)
    assert cache.end.tolist() == [9, 4]
    nxt = _rand_ids((2, 1), seed=3)
    logits, _ = decode_step(tiny, nxt, cache, positions=cache.end[:, None])
    np.testing.assert_allclose(logits[0, 0], tiny(jnp.concatenate([a, nxt[:1]], 1))[0, -1],
                               atol=1e-5)
    np.testing.assert_allclose(logits[1, 0], tiny(jnp.concatenate([b, nxt[1:]], 1))[0, -1],
                               atol=1e-5)


@pytest.mark.parametrize("impl", ["dot_product", "splash_interpret"])
def test_attention_kernels_match_reference(impl):
    cfg = LlamaConfig.preset("tiny").replace(num_hidden_layers=1)
    ref = Llama(cfg, attention="xla", rngs=nnx.Rngs(0))
    other = Llama(cfg, attention=impl, rngs=nnx.Rngs(0))
    ids = _rand_ids((2, 128), seed=9)
    seg = jnp.asarray(np.repeat([[1, 2, 3, 0]], 32, axis=1).repeat(2, axis=0))
    pos = jnp.asarray(np.tile(np.arange(32), 4)[None].repeat(2, axis=0))
    np.testing.assert_allclose(other(ids, positions=pos, segment_ids=seg),
                               ref(ids, positions=pos, segment_ids=seg), atol=2e-5)


def test_causal_query_blocks_skip_only_masked_work():
    from basque_jax.model.attention import AttentionMask, causal_query_blocks, xla_attention

    assert [causal_query_blocks(n) for n in (64, 256, 384, 512, 8192)] == [1, 2, 3, 4, 4]
    r = np.random.default_rng(0)
    b, t, h, kv, d = 2, 512, 4, 2, 16
    q, k, v, w = (jnp.asarray(r.normal(size=s), jnp.float32)
                  for s in ((b, t, h, d), (b, t, kv, d), (b, t, kv, d), (b, t, h, d)))
    slots = jnp.broadcast_to(jnp.arange(t), (b, t))
    seg = jnp.asarray(np.repeat([[1, 2, 3, 0]], t // 4, axis=1).repeat(b, axis=0))
    mask = AttentionMask(slots, slots, seg, seg)

    def loss(q, k, v, blocks):
        return jnp.sum(xla_attention(q, k, v, mask, query_blocks=blocks) * w)

    whole = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, 1)
    blocked = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, 4)
    for a, c in zip(jax.tree.leaves(blocked), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_values_and_gradients(remat):
    cfg = LlamaConfig.preset("tiny")
    base = Llama(cfg, attention="xla", rngs=nnx.Rngs(0))
    ckpt = Llama(cfg, attention="xla", remat=remat, rngs=nnx.Rngs(0))
    ids = _rand_ids((2, 16))

    def loss(m):
        return jnp.mean(jax.nn.logsumexp(m(ids), axis=-1))

    g0 = nnx.grad(loss)(base)
    g1 = nnx.grad(loss)(ckpt)
    for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_load_on_mesh_places_shards_and_matches(hf_checkpoint):
    devices = np.array(jax.devices()[:8]).reshape(2, 2, 2)
    mesh = Mesh(devices, ("data", "fsdp", "tensor"))
    folder = hf_checkpoint("llama31")
    plain = load_pretrained(folder, attention="xla")
    sharded = load_pretrained(folder, mesh=mesh, attention="xla")
    q = sharded.layers.self_attn.q_proj.kernel.value
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (2, 32, 32)
    ids = _rand_ids((4, 16), vocab=256)
    with use_sharding(mesh):
        out = jax.jit(lambda m, x: m(x))(sharded, ids)
    np.testing.assert_allclose(out, plain(ids), atol=1e-5)
