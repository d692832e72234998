"""Arena ratings from pairwise votes: Bradley-Terry maximum likelihood on the Elo scale with
bootstrap intervals, and the online Elo -- both as Chatbot Arena (FastChat) computes them.

Bradley-Terry: P(i beats j) = 1 / (1 + 10 ** ((R_j - R_i) / 400)). The ratings R maximise the
likelihood of all votes, anchored so that their mean is 1000 (the log-strengths sum to zero,
which is where FastChat's unpenalised logistic regression started from zero ends; it also
reproduces the study's ``evaluation/human/frontend/scoring.py``). Ties -- ``tie`` and
``both_bad`` alike, as FastChat treats ``tie`` and ``tie (bothbad)`` -- count as half a win for
each side: every vote has weight 2, a win puts 2 on the winner's side, a tie 1 on each.
When some model has no finite rating (it won every vote, or was never compared with the rest:
flagged ``unbounded``), the mean of the others is the one anchored at 1000.

Intervals: the votes are resampled with replacement (``rounds`` times, as many votes as there
are), each resample is fitted, and the interval is the central ``ci`` quantile range of those
fits (FastChat's ``get_bootstrap_result``; Chatbot Arena reports 95 %, the study 90 %).

Online Elo: the votes in order (oldest first), each moving the two ratings by
``K * (score - expected)`` from 1000, with K = 4 (FastChat's ``compute_elo``); ties score 0.5.
The study reported the Bradley-Terry ratings; the online Elo depends on the vote order and is
given for comparison with older leaderboards.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.sparse.csgraph import connected_components
from scipy.special import expit, log_expit

from basque_jax.arena.votes import WINNERS

SCALE = 400.0
BASE = 10.0
INITIAL_RATING = 1000.0
ONLINE_K = 4.0
_OUTCOME = {w: i for i, w in enumerate(WINNERS)}  # a, b, tie, both_bad


@dataclass
class Tally:
    """Votes counted per ``(model_a, model_b, winner)`` cell; models sorted by name."""

    models: list[str]
    cell_a: np.ndarray
    cell_b: np.ndarray
    cell_outcome: np.ndarray
    cell_count: np.ndarray

    @property
    def total(self) -> int:
        return int(self.cell_count.sum())

    def win_matrix(self, counts: np.ndarray | None = None) -> np.ndarray:
        """``W[i, j]``: weight of i over j (2 per win of i, 1 per tie); ``counts`` per cell."""
        counts = self.cell_count if counts is None else counts
        n = len(self.models)
        w = np.zeros((n, n))
        outcome = self.cell_outcome
        a_won, b_won, tied = outcome == 0, outcome == 1, outcome >= 2
        np.add.at(w, (self.cell_a[a_won], self.cell_b[a_won]), 2 * counts[a_won])
        np.add.at(w, (self.cell_b[b_won], self.cell_a[b_won]), 2 * counts[b_won])
        np.add.at(w, (self.cell_a[tied], self.cell_b[tied]), counts[tied])
        np.add.at(w, (self.cell_b[tied], self.cell_a[tied]), counts[tied])
        return w

    def per_model(self, outcome: str, side: str) -> np.ndarray:
        """Votes per model with the given outcome where the model sat on ``side`` (a/b)."""
        out = np.zeros(len(self.models), dtype=np.int64)
        mask = self.cell_outcome == _OUTCOME[outcome]
        idx = self.cell_a if side == "a" else self.cell_b
        np.add.at(out, idx[mask], self.cell_count[mask])
        return out

    def pair_votes(self) -> np.ndarray:
        """Symmetric ``[n, n]`` count of votes between each pair of models."""
        n = len(self.models)
        out = np.zeros((n, n), dtype=np.int64)
        np.add.at(out, (self.cell_a, self.cell_b), self.cell_count)
        return out + out.T


def tally(outcomes: Iterable[tuple[str, str, str]], models: Sequence[str] = ()) -> Tally:
    """Count ``(model_a, model_b, winner)`` triples (``winner`` in ``WINNERS``); ``models`` adds
    names that may have no votes yet."""
    counts: dict[tuple[str, str, str], int] = {}
    names = set(models)
    for a, b, winner in outcomes:
        if winner not in _OUTCOME:
            raise ValueError(f"winner must be one of {WINNERS}, got {winner!r}")
        counts[(a, b, winner)] = counts.get((a, b, winner), 0) + 1
        names.update((a, b))
    ordered = sorted(names)
    index = {m: i for i, m in enumerate(ordered)}
    keys = list(counts)
    return Tally(
        models=ordered,
        cell_a=np.array([index[k[0]] for k in keys], dtype=np.int64),
        cell_b=np.array([index[k[1]] for k in keys], dtype=np.int64),
        cell_outcome=np.array([_OUTCOME[k[2]] for k in keys], dtype=np.int64),
        cell_count=np.array([counts[k] for k in keys], dtype=np.float64),
    )


def _negative_log_likelihood(free: np.ndarray, w: np.ndarray):
    theta = np.concatenate([[0.0], free])
    diff = theta[:, None] - theta[None, :]
    p = expit(diff)
    total = w + w.T
    value = -(w * log_expit(diff)).sum()
    grad = (total * p - w).sum(axis=1)
    curvature = total * p * (1 - p)
    hess = np.diag(curvature.sum(axis=1)) - curvature
    return value, grad[1:], hess[1:, 1:]


def fit_log_strengths(w: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """Maximum-likelihood log-strengths (natural log) for the win matrix ``w``, mean 0 over
    :func:`finite_group` (over all models when every rating is finite, as usual); models
    without any vote are NaN. Newton trust-region (scipy) on the exact gradient and Hessian."""
    n = len(w)
    present = (w.sum(axis=0) + w.sum(axis=1)) > 0
    theta = np.full(n, np.nan)
    idx = np.flatnonzero(present)
    if len(idx) < 2:
        theta[idx] = 0.0
        return theta
    sub = w[np.ix_(idx, idx)]
    x0 = np.zeros(len(idx) - 1)
    if start is not None and np.all(np.isfinite(start[idx])):
        x0 = start[idx][1:] - start[idx][0]
    last: dict[bytes, tuple] = {}

    def evaluate(x: np.ndarray) -> tuple:  # value, gradient and Hessian share the work
        key = x.tobytes()
        if key not in last:
            last.clear()
            last[key] = _negative_log_likelihood(x, sub)
        return last[key]

    result = minimize(lambda x: evaluate(x)[:2], x0, jac=True, hess=lambda x: evaluate(x)[2],
                      method="trust-exact", options={"gtol": 1e-9, "maxiter": 500})
    grad = np.abs(result.jac).max() if len(result.jac) else 0.0
    if grad > 1e-6 * max(1.0, sub.sum()):  # trust-exact stops on precision loss near 1e-9
        raise RuntimeError(f"Bradley-Terry fit did not converge: {result.message} "
                           f"(gradient {grad:.3g})")
    full = np.concatenate([[0.0], result.x])
    group = finite_group(sub)
    theta[idx] = full - (full[group].mean() if group.any() else full.mean())
    return theta


def to_elo(theta: np.ndarray) -> np.ndarray:
    """Log-strengths (natural log) to the Elo scale (400 points per factor 10 in odds)."""
    return INITIAL_RATING + SCALE * theta / math.log(BASE)


def bootstrap_elo(t: Tally, rounds: int, seed: int | None = 0,
                  start: np.ndarray | None = None) -> np.ndarray:
    """``[rounds, n]`` Bradley-Terry Elo ratings of vote resamples (NaN: absent from one)."""
    rng = np.random.default_rng(seed)
    p = t.cell_count / t.total
    out = np.empty((rounds, len(t.models)))
    for r in range(rounds):
        counts = rng.multinomial(t.total, p).astype(np.float64)
        out[r] = to_elo(fit_log_strengths(t.win_matrix(counts), start))
    return out


def online_elo(outcomes: Iterable[tuple[str, str, str]], k: float = ONLINE_K,
               initial: float = INITIAL_RATING) -> dict[str, float]:
    """FastChat's ``compute_elo``: sequential Elo updates in the given order."""
    rating: dict[str, float] = {}
    for a, b, winner in outcomes:
        ra, rb = rating.setdefault(a, initial), rating.setdefault(b, initial)
        expected_a = 1 / (1 + BASE ** ((rb - ra) / SCALE))
        score_a = {"a": 1.0, "b": 0.0}.get(winner, 0.5)
        rating[a] = ra + k * (score_a - expected_a)
        rating[b] = rb + k * ((1 - score_a) - (1 - expected_a))
    return rating


def finite_group(w: np.ndarray) -> np.ndarray:
    """Models whose maximum-likelihood ratings exist: the largest group (two or more models)
    in which every model can be reached from every other through "won or tied against"
    edges. A model outside it -- never compared with the group, or only ever beating (or
    losing to) it -- has no finite rating relative to the group (Zermelo's condition)."""
    n_groups, labels = connected_components(w > 0, directed=True, connection="strong")
    sizes = np.bincount(labels, minlength=n_groups)
    if sizes.max(initial=0) < 2:
        return np.zeros(len(w), dtype=bool)
    return labels == np.argmax(sizes)


def _warnings(t: Tally, w: np.ndarray) -> list[str]:
    present = (w.sum(axis=0) + w.sum(axis=1)) > 0
    outside = [t.models[i] for i in np.flatnonzero(present & ~finite_group(w))]
    if not outside:
        return []
    return [f"{', '.join(outside)}: not linked to the main group by wins (or ties) in both "
            "directions -- never compared with it, or always winning or always losing -- so "
            "their maximum-likelihood ratings are unbounded (the values shown are where the "
            "fit stopped; 'unbounded' is true)"]


def compute_ratings(outcomes: Sequence[tuple[str, str, str]], *, bootstrap: int = 1000,
                    ci: float = 0.95, seed: int | None = 0, k: float = ONLINE_K,
                    models: Sequence[str] = ()) -> dict[str, Any]:
    """The ratings report (JSON-ready): ``models`` sorted by rating, each with ``name``,
    ``rating``, ``ci_low``, ``ci_high``, ``votes``, wins/losses/ties/both_bad, ``online_elo``
    and ``unbounded`` (won or lost every vote: no finite maximum-likelihood rating), plus how
    they were computed. ``outcomes`` in vote order."""
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    t = tally(outcomes, models)
    w = t.win_matrix()
    theta = fit_log_strengths(w)
    ratings = to_elo(theta)
    low = high = np.full(len(t.models), np.nan)
    if bootstrap > 0 and t.total:
        boot = bootstrap_elo(t, bootstrap, seed, start=theta)
        with warnings.catch_warnings():  # a model absent from every resample: NaN (None)
            warnings.simplefilter("ignore", RuntimeWarning)
            low, high = np.nanpercentile(boot, [50 * (1 - ci), 50 * (1 + ci)], axis=0)
    elo = online_elo(outcomes, k)
    wins = t.per_model("a", "a") + t.per_model("b", "b")
    losses = t.per_model("b", "a") + t.per_model("a", "b")
    ties = t.per_model("tie", "a") + t.per_model("tie", "b")
    both_bad = t.per_model("both_bad", "a") + t.per_model("both_bad", "b")
    present = (w.sum(axis=0) + w.sum(axis=1)) > 0
    unbounded = present & ~finite_group(w)

    def number(x: float) -> float | None:
        return None if not np.isfinite(x) else round(float(x), 9)

    rows = [{"name": name, "rating": number(ratings[i]), "ci_low": number(low[i]),
             "ci_high": number(high[i]), "votes": int(wins[i] + losses[i] + ties[i]
                                                      + both_bad[i]),
             "wins": int(wins[i]), "losses": int(losses[i]), "ties": int(ties[i]),
             "both_bad": int(both_bad[i]), "online_elo": number(elo.get(name, np.nan)),
             "unbounded": bool(unbounded[i])}
            for i, name in enumerate(t.models)]
    rows.sort(key=lambda r: (r["rating"] is None, -(r["rating"] or 0.0), r["name"]))
    return {
        "models": rows,
        "votes": t.total,
        "method": "bradley-terry maximum likelihood (Elo scale)",
        "scale": SCALE, "base": BASE,
        "anchor": f"mean rating {INITIAL_RATING:g} (over the models that are not unbounded)",
        "ties": "tie and both_bad count as half a win for each side (FastChat)",
        "bootstrap": {"rounds": bootstrap, "ci": ci, "seed": seed,
                      "resampling": "votes with replacement, same count"},
        "online_elo": {"k": k, "initial": INITIAL_RATING, "order": "vote order, oldest first"},
        "warnings": _warnings(t, w),
    }
