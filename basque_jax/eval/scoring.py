"""Log-likelihoods of token continuations, batched and sharded: the scorer behind lm-eval's
``loglikelihood`` and ``loglikelihood_rolling`` requests on a basque_jax model.

``score_requests(model, [(context_ids, continuation_ids), ...])`` returns, per request, the sum
of the continuation's log-probabilities under the model and whether every continuation token
is the model's argmax -- lm-eval's ``(logprob, is_greedy)``, computed as its ``hf`` backend
does: context + continuation truncated on the left to ``max_length + 1`` tokens, log-softmax
in float32 (float64 for a float64 model) over the whole output vocabulary, the continuation's
token log-probabilities summed in float64. Requests sharing a long context run it once
(:mod:`basque_jax.eval.shared_prefix`); the others are sorted by length and padded to a few
lengths (at most 25 % or 15 tokens of padding); the output head runs on the
continuations only (each batch's longest, padded likewise). On a mesh rows are split over
the batch axes, every process holding the full request list (SPMD) and reading back every
row's result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from basque_jax.errors import UserError
from basque_jax.eval.shared_prefix import batch_arrays, plan, shared_score_fn
from basque_jax.model.loss import target_logprobs
from basque_jax.sample.requests import FINE_BUCKETS, bucket
from basque_jax.sharding import batch_sharding, batch_shards, to_host, use_sharding

LOGIT_CHUNK = 256  # positions whose [batch, positions, vocab] float32 logits exist at once


def _pieces(t: int) -> int:
    """How many equal pieces of at most about ``LOGIT_CHUNK`` positions ``t`` splits into."""
    least = -(-t // LOGIT_CHUNK)
    return next((n for n in range(least, 2 * least + 1) if t % n == 0), 1)


def score_fn(graphdef: nnx.GraphDef):
    """Jitted ``(state, ids, positions, segments, targets, mask, span=S) -> (logp [b, S],
    greedy [b])``: the log-probability of each target among each row's last ``S`` real
    positions (0 where ``mask`` is 0; summed on the host in float64, so a long document's
    total carries no float32 summation error) and whether every masked target is the argmax.

    Rows are right-padded; ``mask`` must be 0 outside each row's last ``S`` tokens (the
    continuation), so the output head and the log-softmax run on ``S`` positions per row, not
    the whole padded length. Logits are formed about ``LOGIT_CHUNK`` positions at a time (a
    scan), so a batch of long rows never holds ``[batch, seq, vocab]`` float32 logits.
    """

    def score(state, ids, positions, segments, targets, mask, *, span: int):
        model = nnx.merge(graphdef, state)
        hidden = model(ids, positions=positions, segment_ids=segments, return_hidden=True)
        b, t = ids.shape
        if span < t:  # each row's last `span` real positions
            first = jnp.sum(segments > 0, axis=-1, dtype=jnp.int32)[:, None] - span
            idx = first + jnp.arange(span, dtype=jnp.int32)[None, :]
            inside = idx >= 0
            idx = jnp.maximum(idx, 0)
            hidden = jnp.take_along_axis(hidden, idx[..., None], axis=1)
            targets = jnp.take_along_axis(targets, idx, axis=1)
            mask = jnp.where(inside, jnp.take_along_axis(mask, idx, axis=1), 0)
        n = _pieces(span)

        def split(x):
            return x.reshape(b, n, span // n, *x.shape[2:]).swapaxes(0, 1)

        def one(greedy, xs):
            h, tg, m = xs
            picked, ok = target_logprobs(model.logits(h), tg, m)
            return greedy & ok, picked

        greedy, picked = jax.lax.scan(one, jnp.ones((b,), bool),
                                      (split(hidden), split(targets), split(mask)))
        return picked.swapaxes(0, 1).reshape(b, span), greedy

    return jax.jit(score, static_argnames="span")


class Scorer(NamedTuple):
    """The compiled scorers of one model structure: row by row, and shared contexts."""

    rows: Any
    shared: Any


def make_scorer(graphdef: nnx.GraphDef) -> Scorer:
    return Scorer(score_fn(graphdef), shared_score_fn(graphdef))


def score_requests(model: nnx.Module, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                   *, batch_size: int = 8, max_length: int | None = None,
                   mesh: Mesh | None = None, rules: dict | None = None,
                   scorer: Scorer | None = None, share_contexts: bool = True
                   ) -> list[tuple[float, bool]]:
    """``(log-likelihood, is_greedy)`` of each ``(context, continuation)`` token-id pair.

    Rows longer than ``max_length`` (default: the model's ``max_position_embeddings``) lose
    tokens from the left. With a ``mesh``, rows are sharded over its batch axes (the batch is
    rounded up to a multiple of their size). Requests with the same context run it once
    (:mod:`basque_jax.eval.shared_prefix`) unless ``share_contexts`` is False.
    ``scorer``: a :func:`make_scorer` to reuse.
    """
    max_length = max_length or model.config.max_position_embeddings
    ways = 1 if mesh is None else batch_shards(mesh, rules)
    batch_size = -(-batch_size // ways) * ways
    graphdef, state = nnx.split(model)
    scorer = scorer or make_scorer(graphdef)

    def run(fn, arrays: dict[str, np.ndarray], **static: Any) -> tuple[np.ndarray, np.ndarray]:
        if mesh is None:
            ll, greedy = fn(state, *map(jnp.asarray, arrays.values()), **static)
        else:
            sharding = batch_sharding(mesh, rules)
            placed = [jax.make_array_from_callback(a.shape, sharding, lambda idx, a=a: a[idx])
                      for a in arrays.values()]
            with use_sharding(mesh, rules):
                ll, greedy = fn(state, *placed, **static)
        ll, greedy = to_host((ll, greedy))
        return ll.astype(np.float64).sum(axis=-1), greedy

    rows = []
    for ctx, cont in requests:
        if not cont:
            raise UserError("empty continuation (a choice that encodes to no tokens)")
        if not ctx:
            raise UserError("empty context: give a BOS token or a prompt")
        tokens = [*ctx, *cont][-(max_length + 1):]
        rows.append((tokens, min(len(cont), len(tokens) - 1)))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    shared, alone = plan(rows, batch_size) if share_contexts else ([], list(range(len(rows))))
    for batch in shared:
        ll, greedy = run(scorer.shared, batch_arrays(batch, rows, batch_size, max_length, ways))
        for r, i in enumerate(i for members in batch.members for i in members):
            out[i] = (float(ll[r]), bool(greedy[r]))
    order = sorted(alone, key=lambda i: -len(rows[i][0]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        length = bucket(max(len(rows[i][0]) - 1 for i in chunk), max_length, FINE_BUCKETS)
        span = bucket(max(rows[i][1] for i in chunk), length, FINE_BUCKETS)
        arrays = {k: np.zeros((batch_size, length), np.int32)
                  for k in ("ids", "positions", "segments", "targets", "mask")}
        for r, i in enumerate(chunk):
            tokens, n_cont = rows[i]
            n = len(tokens) - 1
            arrays["ids"][r, :n] = tokens[:-1]
            arrays["targets"][r, :n] = tokens[1:]
            arrays["positions"][r, :n] = np.arange(n)
            arrays["segments"][r, :n] = 1
            arrays["mask"][r, n - n_cont:n] = 1
        ll, greedy = run(scorer.rows, arrays, span=span)
        for r, i in enumerate(chunk):
            out[i] = (float(ll[r]), bool(greedy[r]))
    return out
