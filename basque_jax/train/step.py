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
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from basque_jax.data.batch import BATCH_KEYS
from basque_jax.sharding import current_sharding


@dataclass(frozen=True)
class StepOptions:
    """Static knobs of the step."""

    micro_batches: int = 1
    neftune_alpha: float = 0.0
    z_loss: float = 0.0
    seed: int = 0
    loss_chunk: int = 0


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                         z_loss: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Summed (not averaged) cross-entropy and z-loss over the masked target tokens."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jnp.sum((lse - picked) * mask)
    z = jnp.sum(jnp.square(lse) * mask) * z_loss
    return nll, z


def neftune_noise(key: jax.Array, embeds: jax.Array, alpha: float) -> jax.Array:
    """NEFTune: uniform noise of magnitude ``alpha / sqrt(seq_len * hidden)`` (as HF adds it)."""
    scale = alpha / jnp.sqrt(jnp.asarray(embeds.shape[1] * embeds.shape[2], jnp.float32))
    noise = jax.random.uniform(key, embeds.shape, jnp.float32, -1.0, 1.0) * scale
    return embeds + noise.astype(embeds.dtype)


def microbatch_loss(model, batch: dict[str, jax.Array], key: jax.Array | None,
                    options: StepOptions) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed loss of one micro-batch and its counters (train mode when ``key`` is given)."""
    kwargs: dict[str, Any] = {}
    if key is not None:
        noise_key, dropout_key = jax.random.split(key)
        kwargs["dropout_key"] = dropout_key
        if options.neftune_alpha > 0:
            embeds = neftune_noise(noise_key, model.embed_tokens(batch["input_ids"]),
                                   options.neftune_alpha)
            kwargs["inputs_embeds"] = embeds
    hidden = model(batch["input_ids"], positions=batch["positions"],
                   segment_ids=batch["segment_ids"], return_hidden=True, **kwargs)
    nll, z = chunked_cross_entropy(model.logits, hidden, batch["targets"], batch["loss_mask"],
                                   options.z_loss, options.loss_chunk)
    return nll + z, {"nll_sum": nll, "tokens": jnp.sum(batch["loss_mask"])}


def chunked_cross_entropy(project: Callable[[jax.Array], jax.Array], hidden: jax.Array,
                          targets: jax.Array, mask: jax.Array, z_loss: float,
                          chunk: int) -> tuple[jax.Array, jax.Array]:
    """:func:`masked_cross_entropy` of ``project(hidden)`` over sequence chunks of ``chunk``
    tokens, each rematerialised in the backward pass, so the ``[batch, seq, vocab]`` logits
    never exist at once (4 GiB per 8192-token row at Llama 3's 128k vocabulary). ``chunk`` 0
    (or one that does not divide the sequence) computes the logits in one piece."""
    b, t, h = hidden.shape
    if chunk <= 0 or chunk >= t or t % chunk:
        return masked_cross_entropy(project(hidden), targets, mask, z_loss)
    n = t // chunk

    def split(x):
        return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def one(carry, xs):
        hc, tc, mc = xs
        nll, z = masked_cross_entropy(project(hc), tc, mc, z_loss)
        return (carry[0] + nll, carry[1] + z), None

    zero = jnp.zeros((), jnp.float32)
    (nll, z), _ = jax.lax.scan(one, (zero, zero), (split(hidden), split(targets), split(mask)))
    return nll, z


@jax.tree_util.register_dataclass
@dataclass
class TrainState:
    """What the step updates (and the checkpoint saves): step, trainable params, optimizer."""

    step: jax.Array
    params: Any
    opt_state: Any


def init_train_state(trainable: nnx.State, optimizer: optax.GradientTransformation
                     ) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable))


def _split_micro(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    def split(x):
        x = x.reshape(n, x.shape[0] // n, *x.shape[1:])
        ctx = current_sharding()
        if ctx is not None:
            x = jax.lax.with_sharding_constraint(x, ctx.sharding((None, "batch", "sequence")))
        return x
    return {k: split(v) for k, v in batch.items()}


def make_step_fn(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                 schedule: optax.Schedule, options: StepOptions) -> Callable:
    """The un-jitted step ``(state, frozen, batch) -> (state, metrics)``."""

    def loss_fn(params, frozen, micro, key):
        model = nnx.merge(graphdef, params, frozen)
        return microbatch_loss(model, micro, key, options)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, frozen: nnx.State, batch: dict[str, jax.Array]):
        base_key = jax.random.fold_in(jax.random.key(options.seed), state.step)
        micro = _split_micro(batch, options.micro_batches)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)

        def accumulate(carry, xs):
            grads, loss, nll, tokens = carry
            i, mb = xs
            (mb_loss, aux), g = grad_fn(state.params, frozen, mb, jax.random.fold_in(base_key, i))
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            return (grads, loss + mb_loss, nll + aux["nll_sum"], tokens + aux["tokens"]), None

        init = (zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
        xs = (jnp.arange(options.micro_batches), micro)
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


def make_eval_fn(graphdef: nnx.GraphDef) -> Callable:
    """``(params, frozen, batch) -> (nll_sum, tokens)`` with no noise or dropout."""

    def evaluate(params, frozen, batch):
        model = nnx.merge(graphdef, params, frozen)
        _, aux = microbatch_loss(model, batch, None, StepOptions())
        return aux["nll_sum"], aux["tokens"]

    return evaluate


def state_shardings(tree: Any) -> Any:
    """The sharding of every array in ``tree`` (placed arrays carry their own)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def batch_shardings(mesh, batch_spec: PartitionSpec) -> dict[str, NamedSharding]:
    return {k: NamedSharding(mesh, batch_spec) for k in BATCH_KEYS}


def jit_step(step_fn: Callable, state: TrainState, frozen: nnx.State,
             batch_sharding: dict[str, NamedSharding]) -> Callable:
    """Compile with explicit shardings taken from the placed state; the state is donated."""
    replicated = NamedSharding(batch_sharding["input_ids"].mesh, PartitionSpec())
    state_sh = state_shardings(state)
    return jax.jit(
        step_fn,
        in_shardings=(state_sh, state_shardings(frozen), batch_sharding),
        out_shardings=(state_sh, replicated),
        donate_argnums=(0,),
    )
