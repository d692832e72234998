"""Requests that share a context -- a multiple-choice question's choices -- scored with the
context run once: the context goes through the model into a KV cache (one row per distinct
context), each continuation then runs against its context's cache rows
(:func:`basque_jax.model.decode.forward`), and the context's last position predicts each
continuation's first token. Same log-probabilities as scoring every ``context + choice`` row
in full (float32 rounding aside), for a fraction of the work: a 5-shot question with four
one-token answers costs one forward of the context instead of four.

A request joins a group when at least one other request has the same (truncated) context of
at least :data:`MIN_SHARED_CONTEXT` tokens and its continuation is no longer than that context;
everything else is scored row by row (:mod:`basque_jax.eval.scoring`). On SmolLM2 (CPU,
TruthfulQA-eu choices) the shared path is 2.3x faster with 3-shot contexts (168-240 tokens),
but 0.75x with 0-shot ones (23-31 tokens): the per-layer cache programs cost more than they
save on short contexts (and compile for longer), hence the threshold.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from basque_jax.model.decode import forward, init_slot_cache, layer_modules
from basque_jax.model.loss import target_logprobs
from basque_jax.sample.requests import FINE_BUCKETS, bucket

Row = tuple[list[int], int]  # truncated context + continuation tokens, continuation length
MIN_SHARED_CONTEXT = 64


class SharedBatch(NamedTuple):
    """Distinct contexts and, per context, the rows (request indices) that continue it."""

    contexts: list[list[int]]
    members: list[list[int]]


def plan(rows: Sequence[Row], batch_size: int) -> tuple[list[SharedBatch], list[int]]:
    """Batches of grouped rows (at most ``batch_size`` continuations each, longest contexts
    first) and the indices of the rows left to score one by one."""
    groups: dict[tuple[int, ...], list[int]] = collections.defaultdict(list)
    alone = []
    for i, (tokens, n_cont) in enumerate(rows):
        context = tuple(tokens[:len(tokens) - n_cont])
        if MIN_SHARED_CONTEXT <= len(context) >= n_cont:
            groups[context].append(i)
        else:
            alone.append(i)
    pieces = []
    for context, members in groups.items():
        if len(members) < 2:
            alone += members
            continue
        pieces += [(list(context), members[k:k + batch_size])
                   for k in range(0, len(members), batch_size)]
    pieces.sort(key=lambda p: -len(p[0]))
    batches: list[SharedBatch] = []
    for context, members in pieces:
        if not batches or sum(map(len, batches[-1].members)) + len(members) > batch_size:
            batches.append(SharedBatch([], []))
        batches[-1].contexts.append(context)
        batches[-1].members.append(members)
    return batches, sorted(alone)


def batch_arrays(batch: SharedBatch, rows: Sequence[Row], batch_size: int, max_length: int,
                 ways: int = 1) -> dict[str, np.ndarray]:
    """The inputs of :func:`shared_score_fn` for one batch: contexts padded to a few widths
    (rows to a power of two and a multiple of ``ways``, the batch-sharding shards), and
    ``batch_size`` continuation rows (their own tokens but the last, targets, mask)."""
    n = len(batch.contexts)
    g = -(-(1 << max(n - 1, 0).bit_length()) // ways) * ways
    width = bucket(max(map(len, batch.contexts)), max_length, FINE_BUCKETS)
    longest = max(rows[i][1] for members in batch.members for i in members)
    span = bucket(longest - 1, max_length, FINE_BUCKETS) if longest > 1 else 0
    a = {"context": np.zeros((g, width), np.int32), "context_len": np.zeros((g, 1), np.int32),
         "tokens": np.zeros((batch_size, max(span, 1)), np.int32),
         "group": np.zeros((batch_size, 1), np.int32),
         "targets": np.zeros((batch_size, 1 + span), np.int32),
         "mask": np.zeros((batch_size, 1 + span), np.int32)}
    r = 0
    for k, (context, members) in enumerate(zip(batch.contexts, batch.members, strict=True)):
        a["context"][k, :len(context)] = context
        a["context_len"][k] = len(context)
        for i in members:
            tokens, n_cont = rows[i]
            cont = tokens[len(tokens) - n_cont:]
            a["tokens"][r, :n_cont - 1] = cont[:-1]
            a["group"][r] = k
            a["targets"][r, :n_cont] = cont
            a["mask"][r, :n_cont] = 1
            r += 1
    return a


def shared_score_fn(graphdef: nnx.GraphDef):
    """Jitted ``(state, context [g, w], context_len [g, 1], tokens [m, s], group [m, 1],
    targets [m, 1 + s], mask [m, 1 + s]) -> (logp [m, 1 + s], greedy [m])``, the arrays of
    :func:`batch_arrays`: target ``j`` of row ``r`` is predicted by the last context token
    (``j = 0``) or by ``tokens[r, j - 1]``; ``mask`` marks the continuation's targets."""

    def score(state, context, context_len, tokens, group, targets, mask):
        model = nnx.merge(graphdef, state)
        layers = layer_modules(model)
        g, width = context.shape
        span = targets.shape[1] - 1
        cache = init_slot_cache(model.config, g, width + span, model.dtype)
        positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (g, width))
        hidden, cache = forward(model, layers, context, positions,
                                (positions < context_len).astype(jnp.int32), cache)
        last = jnp.take_along_axis(hidden, jnp.maximum(context_len - 1, 0)[..., None], axis=1)
        rows = group[:, 0]
        hidden = last[rows]
        if span:  # the continuations' own tokens, each row against its context's cache
            cache = jax.tree.map(lambda x: x[rows], cache)
            pos = context_len[rows] + jnp.arange(span, dtype=jnp.int32)[None, :]
            own, _ = forward(model, layers, tokens, pos, mask[:, 1:], cache)
            hidden = jnp.concatenate([hidden, own], axis=1)
        return target_logprobs(model.logits(hidden), targets, mask)

    return jax.jit(score)
