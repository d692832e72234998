"""What goes in and out of the :class:`~basque_jax.sample.sampler.Sampler`: its config, a
request, a completion, and the prompt-length buckets it compiles for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from basque_jax.errors import ConfigError, UserError
from basque_jax.sample.sampling import SamplingParams

MIN_BUCKET = 16
FINE_BUCKETS = 4  # lengths per octave where padding costs more than compiling (eval)


@dataclass(frozen=True)
class SamplerConfig:
    """The ``sampler:`` section: row slots (rounded up to a multiple of the batch-sharding
    mesh axes), cache length (every request needs ``len(prompt) + max_new_tokens <= max_len``),
    decode steps between refills while requests wait, the most stop ids per request, the KV
    cache dtype (default: the model's compute dtype), per-layer weight copies (``unstack``,
    default: on CPU, where they are fastest), ``adaptive`` decode chunks (only the rows
    and cache slots in use, rounded up to powers of two; off: always the whole batch) and the
    prompt widths prefill compiles for per octave (``prompt_buckets``: 1, powers of two; 4,
    at most 25 % (or 15 tokens) of padding and four times the programs)."""

    batch_size: int = 32
    max_len: int = 4096
    chunk_steps: int = 32
    max_stop_ids: int = 8
    cache_dtype: str | None = None
    unstack: bool | None = None
    adaptive: bool = True
    prompt_buckets: int = 1

    def __post_init__(self) -> None:
        for key in ("batch_size", "chunk_steps", "max_stop_ids"):
            if getattr(self, key) < 1:
                raise ConfigError(f"sampler.{key}: must be >= 1, got {getattr(self, key)}")
        if self.prompt_buckets < 1 or self.prompt_buckets & (self.prompt_buckets - 1):
            raise ConfigError(f"sampler.prompt_buckets: must be a power of two, got "
                              f"{self.prompt_buckets}")
        if self.max_len < 2:
            raise ConfigError(f"sampler.max_len: must be >= 2, got {self.max_len}")


class Request(NamedTuple):
    """One prompt to complete: token ids, how to sample, the seed of its key, a caller tag."""

    prompt: Sequence[int]
    params: SamplingParams
    seed: int = 0
    tag: Any = None


@dataclass(frozen=True)
class Completion:
    """Generated ids (the stop id removed unless ``include_stop``), why the row ended
    (``"stop"`` or ``"length"``) and the stop id that ended it."""

    tokens: list[int]
    finish_reason: str
    stop_id: int | None = None


class PromptTooLong(UserError):
    """A prompt plus its token budget does not fit the cache."""


def bucket(n: int, cap: int, per_octave: int = 1) -> int:
    """The padded length for ``n`` tokens, at least ``MIN_BUCKET`` and at most ``cap``: the
    next power of two (``per_octave`` 1), or a multiple of 1/``per_octave`` (a power of two)
    of the power of two below ``n`` -- finer buckets, more compiled shapes, less padding."""
    if n <= MIN_BUCKET:
        return min(cap, MIN_BUCKET)
    step = max(MIN_BUCKET, (1 << ((n - 1).bit_length() - 1)) // per_octave)
    return min(cap, -(-n // step) * step)


def completion_of(ids: np.ndarray, params: SamplingParams) -> Completion:
    tokens = [int(t) for t in ids]
    if tokens and tokens[-1] in params.stop_ids:
        stop = tokens[-1]
        return Completion(tokens if params.include_stop else tokens[:-1], "stop", stop)
    return Completion(tokens, "length")


def row_arrays(reqs: Sequence[Request | None], width: int, max_stop_ids: int
               ) -> dict[str, np.ndarray]:
    """The prefill inputs of ``reqs`` (None: an empty row): right-padded prompts, lengths,
    seeds, sampling parameters, token budgets, ``-1``-padded stop ids."""
    n = len(reqs)
    a = {"tokens": np.zeros((n, width), np.int32), "lengths": np.zeros(n, np.int32),
         "seeds": np.zeros(n, np.uint32), "temperature": np.zeros(n, np.float32),
         "top_k": np.zeros(n, np.int32), "top_p": np.ones(n, np.float32),
         "min_p": np.zeros(n, np.float32), "max_new": np.ones(n, np.int32),
         "stops": np.full((n, max_stop_ids), -1, np.int32)}
    for i, r in enumerate(reqs):
        if r is None:
            continue
        p = r.params
        a["tokens"][i, :len(r.prompt)] = r.prompt
        a["lengths"][i] = len(r.prompt)
        a["seeds"][i] = r.seed % (1 << 32)
        a["temperature"][i], a["top_k"][i] = p.temperature, p.top_k
        a["top_p"][i], a["min_p"][i], a["max_new"][i] = p.top_p, p.min_p, p.max_new_tokens
        a["stops"][i, :len(p.stop_ids)] = p.stop_ids
    return a
