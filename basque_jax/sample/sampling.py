"""Token selection: greedy, temperature, top-k, top-p (nucleus) and min-p, one row at a time.

Every row carries its own parameters (arrays ``[batch]``), so requests with different settings
share a batch. A row's token is a pure function of its logits, its parameters and its key:

    keep = top-k ∩ top-p ∩ min-p (on logits / temperature, ties at a threshold kept)
    token = argmax over kept ids of (logits / temperature + gumbel(key)[id])

The Gumbel noise is drawn over the whole vocabulary and indexed by token id, so how the
thresholds are found (a full sort, a top-K, or no sort at all -- the static ``SortMode``) never
changes the sample. ``temperature == 0`` is greedy (plain argmax of the raw logits).
Filtering follows transformers' warpers: top-k first, top-p on the renormalised top-k
distribution, min-p relative to the most likely token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp

from basque_jax.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    temperature: 0 means greedy. top_k: 0 means off. top_p: 1.0 means off. min_p: 0.0 means
    off. stop_ids: token ids that end the row (the stop token is kept in ``Completion.tokens``
    when ``include_stop``). max_new_tokens: generated tokens at most (stop token included).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    max_new_tokens: int = 128
    stop_ids: tuple[int, ...] = ()
    include_stop: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an int >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             "max_new_tokens must be an int >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"sampling: {msg}, got {self}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        """JSON-ready parameters (for record metadata)."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "min_p": self.min_p, "max_new_tokens": self.max_new_tokens,
                "stop_ids": list(self.stop_ids), "include_stop": self.include_stop}


@dataclass
class SamplingConfig:
    """Config form of :class:`SamplingParams`: stop tokens named by their vocabulary entry
    (``<|eot_id|>``), resolved against the tokenizer at start-up (:meth:`params`). An empty
    ``stop_tokens`` list means: the chat template's end-of-turn tokens."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int = 512
    stop_tokens: list[str] = field(default_factory=list)
    include_stop: bool = False

    def __post_init__(self) -> None:
        try:
            SamplingParams(self.temperature, self.top_k, self.top_p, self.min_p,
                           self.max_new_tokens)
        except ConfigError as e:
            raise ConfigError(str(e).replace("sampling: ", "")) from None

    def params(self, tokenizer, default_stops: tuple[int, ...] = ()) -> SamplingParams:
        """Resolved against ``tokenizer`` (ConfigError naming an unknown stop token);
        ``default_stops`` when no stop token is named."""
        stops = []
        for name in self.stop_tokens:
            try:
                stops.append(tokenizer.token_id(name))
            except KeyError as e:
                raise ConfigError(f"stop_tokens: {e.args[0]}") from None
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.min_p,
                              self.max_new_tokens, tuple(stops) or default_stops,
                              self.include_stop)


class RowParams(NamedTuple):
    """Per-row sampling parameters as device arrays ``[batch]``."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array


# A static description of the work the rows of a batch need: "greedy" (argmax only), "none"
# (temperature/min-p only: no sort) or ``(K, nucleus)``: thresholds from the K largest logits
# (top-k rows need K >= their k); with ``nucleus`` some row has top-p without top-k, which
# starts from the TOP_P_PREFIX largest logits and falls back to a full sort only for a row
# whose nucleus is wider.
SortMode = str | tuple[int, bool]
TOP_P_PREFIX = 256


def sort_mode(params: list[SamplingParams], vocab_size: int) -> SortMode:
    """The cheapest ``SortMode`` that serves every row in ``params``."""
    sampled = [p for p in params if not p.greedy]
    if not sampled:
        return "greedy"
    if all(p.top_k == 0 and p.top_p == 1.0 for p in sampled):
        return "none"
    k = max(p.top_k for p in sampled)
    k = 1 << (k - 1).bit_length() if k else 0  # round up: fewer compiled variants
    nucleus = any(p.top_k == 0 and p.top_p < 1.0 for p in sampled)
    if nucleus:
        k = max(k, TOP_P_PREFIX)
    return min(vocab_size, k), nucleus and k < vocab_size


ARGMAX_BLOCK = 128


def argmax(x: jax.Array) -> jax.Array:
    """``jnp.argmax(x, -1)`` (first maximum) for ``[batch, n]``, in two cheap passes: the best
    block of ``ARGMAX_BLOCK`` values, then the best entry in it (XLA:CPU's variadic
    value-and-index reduction over a 32k vocabulary costs more than the sampling itself)."""
    b, n = x.shape
    pad = -n % ARGMAX_BLOCK
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    blocks = x.reshape(b, -1, ARGMAX_BLOCK)
    best = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)
    inner = jnp.argmax(jnp.take_along_axis(blocks, best[:, None, None], axis=1)[:, 0], axis=-1)
    return (best * ARGMAX_BLOCK + inner).astype(jnp.int32)


def select_tokens(logits: jax.Array, params: RowParams, keys: jax.Array,
                  mode: SortMode) -> jax.Array:
    """Next token ``[batch]`` (int32) from ``logits [batch, vocab]`` and per-row ``keys``."""
    logits = logits.astype(jnp.float32)
    greedy = argmax(logits)
    if mode == "greedy":
        return greedy
    temp = jnp.maximum(params.temperature, 1e-6)[:, None]
    scaled = logits / temp
    keep = keep_mask(scaled, params, mode)
    noise = jax.vmap(lambda k: jax.random.gumbel(k, (logits.shape[-1],), jnp.float32))(keys)
    sampled = argmax(jnp.where(keep, scaled + noise, -jnp.inf))
    return jnp.where(params.temperature == 0, greedy, sampled)


def keep_mask(scaled: jax.Array, params: RowParams, mode: SortMode) -> jax.Array:
    """Boolean ``[batch, vocab]``: the ids top-k, top-p and min-p leave in play."""
    top = jnp.max(scaled, axis=-1, keepdims=True)
    # min-p: p_i >= min_p * p_max  <=>  s_i >= s_max + log(min_p)
    keep = scaled >= top + jnp.log(jnp.maximum(params.min_p, 1e-30))[:, None]
    if mode == "none":
        return keep
    k, nucleus = mode
    vocab = scaled.shape[-1]
    lse = jax.nn.logsumexp(scaled, axis=-1)
    threshold, complete = _thresholds(jax.lax.top_k(scaled, k)[0], params, lse, vocab)
    if nucleus:  # a nucleus wider than the prefix: that row's threshold from a full sort

        def full() -> jax.Array:
            ranked = -jnp.sort(-scaled, axis=-1)
            return jnp.where(complete, threshold, _thresholds(ranked, params, lse, vocab)[0])

        threshold = jax.lax.cond(jnp.all(complete), lambda: threshold, full)
    return keep & (scaled >= threshold[:, None])


def _thresholds(vals: jax.Array, params: RowParams, lse: jax.Array, vocab: int
                ) -> tuple[jax.Array, jax.Array]:
    """Per-row smallest kept scaled logit from the K largest ``vals`` (descending), and
    whether K sufficed to find it. Top-p runs on the top-k-renormalised distribution (as in
    transformers) or, without top-k, on the full one (normaliser ``lse``)."""
    k = vals.shape[-1]
    ranks = jnp.arange(k, dtype=jnp.int32)[None, :]
    has_k = params.top_k > 0
    limit = jnp.where(has_k, jnp.minimum(params.top_k, k), k)[:, None]
    vals = jnp.where(ranks < limit, vals, -jnp.inf)
    norm = jnp.where(has_k, jax.nn.logsumexp(vals, axis=-1), lse)
    probs = jnp.exp(vals - norm[:, None])
    before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.sum((before < params.top_p[:, None]) & (ranks < limit), axis=-1)
    threshold = jnp.take_along_axis(vals, jnp.maximum(n_keep - 1, 0)[:, None], axis=-1)[:, 0]
    unfiltered = ~has_k & (params.top_p >= 1.0)
    threshold = jnp.where(unfiltered, -jnp.inf, threshold)
    return threshold, has_k | unfiltered | (n_keep < k) | (k == vocab)


def row_keys(seeds: jax.Array, counters: jax.Array) -> jax.Array:
    """One key per row from its ``seeds [batch]`` (uint32) and token counter ``[batch]``."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)
