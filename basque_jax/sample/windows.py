"""Decode and prefill windows: the part of the sampler's state a compiled program runs on.

A window is rows ``start .. start + rows - 1`` of every per-row array and, of the KV cache,
slots ``0 .. length - 1``. The sampler picks the rows up to its last busy one and the cache
slots they have written or will write, each rounded up to a power of two (at least
:data:`WINDOW_MIN` slots), so one busy row of 32 costs one row and a 100-token context reads
128 slots, not ``max_len``; a handful of shapes compile.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from basque_jax.model.decode import SlotCache

WINDOW_MIN = 64  # the shortest cache window a decode chunk compiles for


def ladder(start: int, cap: int) -> list[int]:
    """Powers of two from ``start`` (at most ``cap``) up to ``cap``, then ``cap`` itself."""
    sizes = [min(start, cap)]
    while sizes[-1] < cap:
        sizes.append(min(cap, sizes[-1] * 2))
    return sizes


def rows_for(n: int, batch_size: int) -> int:
    """Rows of the window that holds row ``n - 1``: a power of two, at most ``batch_size``."""
    return min(batch_size, 1 << max(n - 1, 0).bit_length())


def decode_window(prompt_lengths: Sequence[int], n_out: Sequence[int], budgets: Sequence[int],
                  busy: Sequence[int], steps: int | None, *, batch_size: int, max_len: int,
                  chunk_steps: int) -> tuple[int, int, int]:
    """``(rows, cache length, steps)`` of the next decode chunk over the ``busy`` rows (row
    indices, ascending; per busy row its prompt length, tokens generated, token budget).

    ``steps`` None (draining): until the shortest budget left ends, at least ``chunk_steps``,
    so that the window can shrink as rows finish. A row's next free cache slot is its prompt
    plus every generated token but the last (not yet fed back).
    """
    left = [b - n for b, n in zip(budgets, n_out, strict=True)]
    steps = max(chunk_steps, min(left)) if steps is None else steps
    steps = max(1, min(steps, max(left)))
    end = max(p + n - 1 for p, n in zip(prompt_lengths, n_out, strict=True))
    length = min(max_len, max(WINDOW_MIN, 1 << (end + steps - 1).bit_length()))
    return rows_for(busy[-1] + 1, batch_size), length, steps


def take_window(state: Any, rows: int, length: int, start: Any = 0) -> Any:
    """The window of a sampler state (a NamedTuple with a ``cache`` :class:`SlotCache` and
    per-row arrays); ``start`` may be traced."""

    def cut(x: jax.Array, seq_axis: int | None = None) -> jax.Array:
        x = jax.lax.dynamic_slice_in_dim(x, start, rows, axis=0)
        return x if seq_axis is None else jax.lax.slice_in_dim(x, 0, length, axis=seq_axis)

    c = state.cache
    cache = SlotCache(tuple(cut(k, 3) for k in c.k), tuple(cut(v, 2) for v in c.v),
                      cut(c.segment_ids, 1), cut(c.end))
    return jax.tree.map(cut, state._replace(cache=None))._replace(cache=cache)


def put_window(state: Any, part: Any, start: Any = 0) -> Any:
    """``state`` with its window at ``start`` replaced by ``part`` (:func:`take_window`)."""

    def put(full: jax.Array, p: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice(full, p.astype(full.dtype),
                                            (start,) + (0,) * (full.ndim - 1))

    return jax.tree.map(put, state, part)


def busy_rows(slots: Sequence[Any]) -> np.ndarray:
    """Indices of the occupied slots."""
    return np.flatnonzero([r is not None for r in slots])
