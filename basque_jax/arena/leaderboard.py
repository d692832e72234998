"""The live leaderboard: ratings of the stored votes, recomputed in the background.

A background thread recomputes the Bradley-Terry ratings and their bootstrap intervals when
the number of stored votes has changed -- woken at once by a new vote (at most once a second)
and otherwise every ``refresh_s`` seconds, which also picks up votes written by other server
processes sharing the database. Readers (the page, adaptive pairing) get the latest
:class:`Standings` without waiting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from basque_jax.arena.ratings import compute_ratings
from basque_jax.arena.store import VoteStore

log = logging.getLogger(__name__)
MIN_INTERVAL_S = 1.0


@dataclass(frozen=True)
class Standings:
    """One computed leaderboard: the ratings report (None before the first vote)."""

    votes: int = 0
    report: dict[str, Any] | None = None
    pair_votes: dict[frozenset[str], int] = field(default_factory=dict)
    computed_at: float = field(default_factory=time.time)

    @property
    def intervals(self) -> dict[str, tuple[float, float]]:
        """Bootstrap interval of every model that has one."""
        if self.report is None:
            return {}
        return {r["name"]: (r["ci_low"], r["ci_high"]) for r in self.report["models"]
                if r["ci_low"] is not None and r["ci_high"] is not None}

    def rows(self, models: Sequence[str]) -> list[list[Any]]:
        """Table rows ``[rank, model, rating, interval, votes]``. Models without a finite rating
        yet (no votes, or won/lost all of them) come last, unranked, with their vote count."""
        rows: list[list[Any]] = []
        seen = set()
        rated = [r for r in (self.report or {}).get("models", [])
                 if r["rating"] is not None and not r["unbounded"]]
        for rank, r in enumerate(rated, 1):
            interval = ("" if r["ci_low"] is None
                        else f"{r['ci_low']:.0f} – {r['ci_high']:.0f}")
            rows.append([rank, r["name"], round(r["rating"]), interval, r["votes"]])
            seen.add(r["name"])
        for r in (self.report or {}).get("models", []):  # no finite rating yet
            if r["name"] not in seen:
                rows.append(["", r["name"], "", "", r["votes"]])
                seen.add(r["name"])
        rows += [["", name, "", "", 0] for name in models if name not in seen]
        return rows


class Leaderboard:
    """Keeps :attr:`standings` up to date for ``store`` (see the module docstring)."""

    def __init__(self, store: VoteStore, models: Sequence[str], *, bootstrap: int = 100,
                 ci: float = 0.95, refresh_s: float = 10.0, seed: int = 0) -> None:
        self.store = store
        self.models = list(models)
        self.bootstrap, self.ci, self.refresh_s, self.seed = bootstrap, ci, refresh_s, seed
        self._standings = Standings()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def standings(self) -> Standings:
        return self._standings

    def refresh(self) -> Standings:
        """Recompute now if the vote count changed since the last computation."""
        with self._lock:
            count = self.store.count()
            if count == self._standings.votes and self._standings.report is not None:
                return self._standings
            outcomes = self.store.outcomes()
            report = None
            if outcomes:
                report = compute_ratings(outcomes, bootstrap=self.bootstrap, ci=self.ci,
                                         seed=self.seed, models=self.models)
            self._standings = Standings(votes=len(outcomes), report=report,
                                        pair_votes=_pair_votes(outcomes))
            return self._standings

    def request_refresh(self) -> None:
        """Ask the background thread to recompute soon (a vote was stored)."""
        self._wake.set()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="arena-leaderboard")
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - keep the page alive; the error is logged
                log.exception("arena: leaderboard refresh failed")
            self._stop.wait(max(0.0, MIN_INTERVAL_S - (time.monotonic() - started)))
            self._wake.wait(self.refresh_s)
            self._wake.clear()


def _pair_votes(outcomes: Sequence[tuple[str, str, str]]) -> dict[frozenset[str], int]:
    counts: dict[frozenset[str], int] = {}
    for a, b, _ in outcomes:
        key = frozenset((a, b))
        counts[key] = counts.get(key, 0) + 1
    return counts
