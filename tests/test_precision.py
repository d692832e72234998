"""Float32 compute asks for float32 matmuls everywhere (JAX's default is TF32 on recent GPUs
and one bfloat16 pass on TPU, where torch keeps float32); bfloat16 compute keeps the default.
CPUs compute float32 either way, so the lowered programs are what is checked, lowered with
JAX's default set to its fastest (``bfloat16``: precision DEFAULT on every unpinned matmul)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from basque_jax import Llama, LlamaConfig
from basque_jax.eval.scoring import make_scorer
from basque_jax.model.attention import AttentionMask, attention
from basque_jax.model.decode import decode_step, init_slot_cache
from basque_jax.model.lora import LoraConfig, apply_lora

DOT = re.compile(r"stablehlo\.dot(?:_general)?\b[^\n]*")


def dot_precisions(lowered) -> list[str]:
    """The ``precision`` attribute of every matmul in a lowered program."""
    dots = DOT.findall(lowered.as_text())
    assert dots, "no matmul in the program"
    return [m.group(1) if (m := re.search(r"precision = \[(\w+), \1\]", d)) else ""
            for d in dots]


def programs(dtype, attention: str) -> dict[str, object]:
    """Lowered forward + backward (with LoRA), a decode step and the eval scorer."""
    with jax.default_matmul_precision("bfloat16"):
        return _programs(dtype, attention)


def _programs(dtype, attention: str) -> dict[str, object]:
    model = Llama(LlamaConfig.preset("tiny"), param_dtype=dtype, dtype=dtype,
                  attention=attention, rngs=nnx.Rngs(0))
    ids = jnp.ones((2, 16), jnp.int32)
    cache = init_slot_cache(model.config, 2, 32, dtype)
    step = jax.jit(lambda m, t, c: decode_step(m, t, c)[0])
    scorer = make_scorer(nnx.graphdef(model))
    graphdef, state = nnx.split(model)
    pos = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
    scored = scorer.rows.lower(state, ids, pos, ids, ids, jnp.ones((2, 16), jnp.float32),
                               span=4)
    apply_lora(model, LoraConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    loss = jax.jit(jax.grad(lambda s, t: nnx.merge(graphdef, s)(t).astype(jnp.float32).sum()))
    return {"train": loss.lower(state, ids), "decode": step.lower(model, ids[:, :1], cache),
            "score": scored}


@pytest.mark.parametrize("attention", ["xla", "dot_product"])
def test_float32_compute_runs_every_matmul_at_highest(attention):
    for name, lowered in programs(jnp.float32, attention).items():
        assert set(dot_precisions(lowered)) == {"HIGHEST"}, name


def test_bfloat16_compute_keeps_the_backend_default():
    for name, lowered in programs(jnp.bfloat16, "xla").items():
        assert set(dot_precisions(lowered)) == {"DEFAULT"}, name


@pytest.mark.parametrize("dtype,want", [(jnp.float32, "HIGHEST"), (jnp.bfloat16, "DEFAULT")])
def test_splash_kernel_dots_follow_the_compute_dtype(dtype, want):
    """The Pallas kernel's own matmuls (forward and backward; interpret mode lowers them to
    ordinary dots) take the default precision, which the float32 path sets."""
    q = jnp.ones((1, 128, 4, 16), dtype)
    kv = jnp.ones((1, 128, 2, 16), dtype)

    def loss(q, k, v, segments):  # segment ids traced, as in a train step
        slots = jnp.arange(128)[None]
        mask = AttentionMask(slots, slots, segments, segments)
        return attention(q, k, v, mask, implementation="splash_interpret").astype(
            jnp.float32).sum()

    with jax.default_matmul_precision("bfloat16"):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
            q, kv, kv, jnp.ones((1, 128), jnp.int32))
    assert set(dot_precisions(lowered)) == {want}
