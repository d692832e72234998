"""Which two models answer the next prompt.

``uniform``: every unordered pair equally likely (the study drew two models at random).

``adaptive``: spend votes where the leaderboard is still unsure. Pair (i, j) is drawn with
weight ``(1 + overlap_ij / mean_width) / sqrt(1 + n_ij)``: ``overlap_ij`` is the length of the
intersection of the two models' bootstrap intervals (0 when they are disjoint: the order of the
pair is settled), ``mean_width`` the mean interval width, ``n_ij`` the votes the pair already
has. A model without an interval yet counts as fully overlapping. Every weight stays > 0, so
every pair keeps being compared (the ratings need a connected comparison graph) and a pair
whose order is settled is still sampled, only less.

Which model is shown as A is a fair coin in both modes, so position bias averages out.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping, Sequence

PAIRING_MODES = ("uniform", "adaptive")


def pair_weights(models: Sequence[str], intervals: Mapping[str, tuple[float, float]],
                 pair_votes: Mapping[frozenset[str], int]) -> dict[tuple[str, str], float]:
    """Adaptive weights of every unordered pair (see the module docstring)."""
    widths = [hi - lo for lo, hi in intervals.values() if hi > lo]
    mean_width = sum(widths) / len(widths) if widths else 1.0
    weights = {}
    for a, b in itertools.combinations(models, 2):
        if a in intervals and b in intervals:
            (lo_a, hi_a), (lo_b, hi_b) = intervals[a], intervals[b]
            overlap = max(0.0, min(hi_a, hi_b) - max(lo_a, lo_b)) / mean_width
        else:
            overlap = 1.0
        n = pair_votes.get(frozenset((a, b)), 0)
        weights[(a, b)] = (1.0 + overlap) / math.sqrt(1.0 + n)
    return weights


class PairSampler:
    """Draws ``(model_a, model_b)`` for a round; ``mode`` is ``uniform`` or ``adaptive``."""

    def __init__(self, models: Sequence[str], mode: str = "uniform",
                 seed: int | None = None) -> None:
        if mode not in PAIRING_MODES:
            raise ValueError(f"pairing mode must be one of {PAIRING_MODES}, got {mode!r}")
        if len(set(models)) < 2:
            raise ValueError("pairing needs at least two different models")
        self.models = list(models)
        self.mode = mode
        self._rng = random.Random(seed)

    def draw(self, intervals: Mapping[str, tuple[float, float]] | None = None,
             pair_votes: Mapping[frozenset[str], int] | None = None) -> tuple[str, str]:
        if self.mode == "uniform":
            a, b = self._rng.sample(self.models, 2)
            return a, b
        weights = pair_weights(self.models, intervals or {}, pair_votes or {})
        pairs = list(weights)
        a, b = self._rng.choices(pairs, weights=[weights[p] for p in pairs])[0]
        return (a, b) if self._rng.random() < 0.5 else (b, a)
