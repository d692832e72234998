"""Skipped-record accounting: bad records are skipped and counted, never silently dropped.

``CountingIterDataset`` sits right after tokenization. It flattens each processed record into
its training segments, counts records per source (valid, bad by reason, truncated, dropped,
split), logs the first few bad ones with file and line, and raises ``DataError`` when a
source's bad fraction exceeds ``max_bad_fraction``. The counters live in the iterator state,
so they are checkpointed and survive worker processes: ``collect_stats(iterator.get_state())``
sums them over workers and ``format_stats`` renders the summary.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, NamedTuple

import grain
import numpy as np

from basque_jax.errors import UserError

log = logging.getLogger(__name__)

STATE_KEY = "basque_jax_record_stats"
FIRST_BAD = 5  # how many bad records per source are named in logs and summaries
CHECK_AFTER = 1000  # records of a source seen before the bad fraction is enforced mid-stream
_COUNTERS = ("records", "valid", "bad", "truncated", "dropped_overlong", "split", "segments")


class DataError(UserError):
    """Input data is unusable: missing file, no valid record, too many bad records."""


class ProcessedRecord(NamedTuple):
    """One record after decoding and tokenization.

    segments: training examples (dicts of equal-length ``input_ids``/``targets``/``loss_mask``
      arrays, each at most ``seq_len`` long); empty when the record is skipped.
    error: why the record is bad (skipped and counted against ``max_bad_fraction``).
    note: ``truncated`` / ``dropped_overlong`` / ``split`` -- counted, not bad.
    """

    source: str
    where: str
    segments: list[dict[str, np.ndarray]]
    error: str | None = None
    note: str | None = None


def _new_source_stats() -> dict[str, Any]:
    return {**dict.fromkeys(_COUNTERS, 0), "reasons": {}, "first_bad": []}


def _copy_stats(stats: Mapping[str, Any]) -> dict[str, Any]:
    return {
        n: {**s, "reasons": dict(s["reasons"]), "first_bad": list(s["first_bad"])}
        for n, s in stats.items()
    }


def count_record(stats: dict[str, Any], rec: ProcessedRecord) -> None:
    """Adds one processed record to ``stats`` (``{source: counters}``) in place."""
    s = stats.setdefault(rec.source, _new_source_stats())
    s["records"] += 1
    if rec.note:
        s[rec.note] += 1
    if rec.error is not None:
        s["bad"] += 1
        s["reasons"][rec.error] = s["reasons"].get(rec.error, 0) + 1
        if len(s["first_bad"]) < FIRST_BAD:
            s["first_bad"].append(f"{rec.where}: {rec.error}")
            log.warning("skipping bad record %s: %s", rec.where, rec.error)
    elif rec.segments:
        s["valid"] += 1
        s["segments"] += len(rec.segments)


def check_bad_fraction(
    stats: Mapping[str, Any], max_bad_fraction: float, *, final: bool = False
) -> None:
    """Raises ``DataError`` if a source has too many bad records (or, finally, no valid one)."""
    for name, s in stats.items():
        if not s["records"] or (not final and s["records"] < CHECK_AFTER):
            continue
        if s["bad"] / s["records"] > max_bad_fraction:
            raise DataError(
                f"source {name}: {s['bad']} of {s['records']} records are bad "
                f"(> max_bad_fraction {max_bad_fraction}).\n{format_stats({name: s})}"
            )
        if final and s["valid"] == 0 and s["bad"]:
            raise DataError(f"source {name}: no valid record.\n{format_stats({name: s})}")


def merge_stats(parts: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Sums per-source counters of several workers or hosts."""
    out: dict[str, Any] = {}
    for part in parts:
        for name, s in part.items():
            o = out.setdefault(name, _new_source_stats())
            for k in _COUNTERS:
                o[k] += s[k]
            for reason, n in s["reasons"].items():
                o["reasons"][reason] = o["reasons"].get(reason, 0) + n
            o["first_bad"] = (o["first_bad"] + list(s["first_bad"]))[:FIRST_BAD]
    return out


def collect_stats(state: Any) -> dict[str, Any]:
    """Finds every counting stage in an iterator state (workers included) and sums them."""
    found: list[Mapping[str, Any]] = []

    def walk(x: Any) -> None:
        if isinstance(x, Mapping):
            for k, v in x.items():
                if k == STATE_KEY:
                    found.append(v)
                else:
                    walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(state)
    return merge_stats(found)


def format_stats(stats: Mapping[str, Any]) -> str:
    """Human-readable summary: per source counts, reasons and the first bad records."""
    lines = []
    for name, s in sorted(stats.items()):
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(s["reasons"].items()))
        lines.append(
            f"{name}: {s['records']} records, {s['valid']} valid, {s['bad']} skipped as bad"
            + (f" ({reasons})" if reasons else "")
            + f", {s['truncated']} truncated, {s['dropped_overlong']} dropped as over-long,"
            f" {s['split']} split into chunks"
        )
        lines += [f"  first bad: {w}" for w in s["first_bad"]]
    return "\n".join(lines)


class CountingIterDataset(grain.IterDataset):
    """Flattens ``ProcessedRecord``s into segments, counting and skipping bad records."""

    def __init__(self, parent: grain.IterDataset, *, max_bad_fraction: float):
        super().__init__(parent)
        self._max_bad_fraction = max_bad_fraction

    def __iter__(self) -> _CountingIterator:
        return _CountingIterator(self._parent.__iter__(), self._max_bad_fraction)

    def __str__(self) -> str:
        return f"CountingIterDataset(max_bad_fraction={self._max_bad_fraction})"


class _CountingIterator(grain.DatasetIterator):
    """Reads ahead to the next valid record right after emitting a record's last segment, so
    that the state (and the counters in it) already covers every skipped record before it.

    State: parent state before the pending record (re-read on restore), how many of its
    segments were emitted, and the counters (which include the pending record).
    """

    def __init__(self, parent: grain.DatasetIterator, max_bad_fraction: float):
        super().__init__(parent)
        self._max_bad_fraction = max_bad_fraction
        self._counts: dict[str, Any] = {}
        self._pending: list[dict[str, np.ndarray]] | None = None
        self._emitted = 0
        self._before: Any = None  # parent state before the pending record
        self._done = False

    def _advance(self) -> None:
        """Counts records up to the next one with segments (pending) or the end."""
        while not self._done:
            before = self._parent.get_state()
            try:
                rec = next(self._parent)
            except StopIteration:
                self._done = True
                return
            count_record(self._counts, rec)
            if rec.error is not None:
                check_bad_fraction(self._counts, self._max_bad_fraction)
            elif rec.segments:
                self._pending, self._emitted, self._before = rec.segments, 0, before
                return

    def __next__(self) -> dict[str, np.ndarray]:
        if self._pending is None:
            self._advance()
            if self._pending is None:
                check_bad_fraction(self._counts, self._max_bad_fraction, final=True)
                raise StopIteration
        segment = self._pending[self._emitted]
        self._emitted += 1
        if self._emitted == len(self._pending):
            self._pending = None
            self._advance()
        return segment

    def get_state(self) -> dict[str, Any]:
        pending = self._pending is not None
        return {
            "parent": self._before if pending else self._parent.get_state(),
            "pending": pending,
            "emitted": self._emitted if pending else 0,
            STATE_KEY: _copy_stats(self._counts),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._counts = _copy_stats(state[STATE_KEY])
        self._pending, self._emitted, self._done = None, 0, False
        if state["pending"]:
            rec = next(self._parent)  # already counted: re-read it without counting
            self._pending, self._emitted = rec.segments, state["emitted"]
            self._before = state["parent"]
