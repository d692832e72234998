"""The jitted train step: micro-batch accumulation, exact token-normalised loss, AdamW update.

The model is split once into ``graphdef`` + trainable state (LoRA adapters, or every parameter
for full fine-tuning) + frozen state. The step is a pure function of
``(TrainState, frozen, batch)`` compiled with explicit in/out shardings; the train state is
donated. Loss = summed cross-entropy over target tokens / the global number of target tokens
(across micro-batches and devices), so 4 micro-batches of 2 equal one batch of 8.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from basque_jax.data.batch import BATCH_KEYS
from basque_jax.model.loss import batch_loss
from basque_jax.sharding import current_sharding

if TYPE_CHECKING:
    from basque_jax.config import TrainConfig


@jax.tree_util.register_dataclass
@dataclass
class TrainState:
    """What the step updates (and the checkpoint saves): step, trainable params, optimizer."""

    step: jax.Array
    params: Any
    opt_state: Any


def _split_micro(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    def split(x):
        x = x.reshape(n, x.shape[0] // n, *x.shape[1:])
        ctx = current_sharding()
        if ctx is not None:
            x = jax.lax.with_sharding_constraint(x, ctx.sharding((None, "batch", "sequence")))
        return x
    return {k: split(v) for k, v in batch.items()}


def make_step_fn(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                 schedule: optax.Schedule, train: TrainConfig) -> Callable:
    """The un-jitted step ``(state, frozen, batch) -> (state, metrics)`` for ``train``'s
    micro-batches, NEFTune, z-loss, loss chunking and seed."""

    def loss_fn(params, frozen, micro, key):
        model = nnx.merge(graphdef, params, frozen)
        return batch_loss(model, micro, key, neftune_alpha=train.neftune_alpha,
                          z_loss=train.z_loss, loss_chunk=train.loss_chunk)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, frozen: nnx.State, batch: dict[str, jax.Array]):
        base_key = jax.random.fold_in(jax.random.key(train.seed), state.step)
        micro = _split_micro(batch, train.micro_batches)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)

        def accumulate(carry, xs):
            grads, loss, nll, tokens = carry
            i, mb = xs
            (mb_loss, aux), g = grad_fn(state.params, frozen, mb, jax.random.fold_in(base_key, i))
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            return (grads, loss + mb_loss, nll + aux["nll_sum"], tokens + aux["tokens"]), None

        init = (zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
        xs = (jnp.arange(train.micro_batches), micro)
        (grads, loss, nll, tokens), _ = jax.lax.scan(accumulate, init, xs)
        denom = jnp.maximum(tokens, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss / denom,
            "nll": nll / denom,
            "grad_norm": optax.global_norm(grads),
            "lr": schedule(state.step),
            "target_tokens": tokens,
        }
        return TrainState(state.step + 1, params, opt_state), metrics

    return step


def state_shardings(tree: Any) -> Any:
    """The sharding of every array in ``tree`` (placed arrays carry their own)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def jit_step(step_fn: Callable, state: TrainState, frozen: nnx.State,
             batch_sharding: NamedSharding) -> Callable:
    """Compile with explicit shardings taken from the placed state; the state is donated."""
    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    state_sh = state_shardings(state)
    return jax.jit(
        step_fn,
        in_shardings=(state_sh, state_shardings(frozen), dict.fromkeys(BATCH_KEYS,
                                                                        batch_sharding)),
        out_shardings=(state_sh, replicated),
        donate_argnums=(0,),
    )
