"""The language-modelling loss: summed cross-entropy over target tokens, for training and eval.

One function (:func:`batch_loss`) serves the train step (with a key: NEFTune noise and LoRA
dropout), the held-out loss during training and perplexity evaluation (no key). Losses are
sums, not means, so the caller divides by the global number of target tokens (exact across
micro-batches and devices).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                         z_loss: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Summed (not averaged) cross-entropy and z-loss over the masked target tokens."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jnp.sum((lse - picked) * mask)
    z = jnp.sum(jnp.square(lse) * mask) * z_loss
    return nll, z


def target_logprobs(logits: jax.Array, targets: jax.Array, mask: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """Each target's log-probability (float32, or float64 logits' own; 0 where ``mask`` is 0)
    and, per row, whether every masked target is the argmax: lm-eval's scoring quantities."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    logp = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    on = mask > 0
    greedy = jnp.all(jnp.where(on, jnp.argmax(logits, axis=-1) == targets, True), axis=-1)
    return jnp.where(on, picked, 0.0), greedy


def chunked_cross_entropy(project: Callable[[jax.Array], jax.Array], hidden: jax.Array,
                          targets: jax.Array, mask: jax.Array, z_loss: float,
                          chunk: int) -> tuple[jax.Array, jax.Array]:
    """:func:`masked_cross_entropy` of ``project(hidden)`` over sequence chunks of ``chunk``
    tokens, each rematerialised in the backward pass, so the ``[batch, seq, vocab]`` logits
    never exist at once (4 GiB per 8192-token row at Llama 3's 128k vocabulary). ``chunk`` 0
    (or one that does not divide the sequence) computes the logits in one piece."""
    b, t, _ = hidden.shape
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


def neftune_noise(key: jax.Array, embeds: jax.Array, alpha: float) -> jax.Array:
    """NEFTune: uniform noise of magnitude ``alpha / sqrt(seq_len * hidden)`` (as HF adds it)."""
    scale = alpha / jnp.sqrt(jnp.asarray(embeds.shape[1] * embeds.shape[2], jnp.float32))
    noise = jax.random.uniform(key, embeds.shape, jnp.float32, -1.0, 1.0) * scale
    return embeds + noise.astype(embeds.dtype)


def batch_loss(model, batch: dict[str, jax.Array], key: jax.Array | None = None, *,
               neftune_alpha: float = 0.0, z_loss: float = 0.0, loss_chunk: int = 0
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed loss of one batch (see ``basque_jax.data.batch``) and its counters
    ``{"nll_sum", "tokens"}``; training mode (NEFTune, LoRA dropout) when ``key`` is given."""
    kwargs: dict[str, Any] = {}
    if key is not None:
        noise_key, dropout_key = jax.random.split(key)
        kwargs["dropout_key"] = dropout_key
        if neftune_alpha > 0:
            kwargs["inputs_embeds"] = neftune_noise(
                noise_key, model.embed_tokens(batch["input_ids"]), neftune_alpha)
    hidden = model(batch["input_ids"], positions=batch["positions"],
                   segment_ids=batch["segment_ids"], return_hidden=True, **kwargs)
    nll, z = chunked_cross_entropy(model.logits, hidden, batch["targets"], batch["loss_mask"],
                                   z_loss, loss_chunk)
    return nll + z, {"nll_sum": nll, "tokens": jnp.sum(batch["loss_mask"])}
