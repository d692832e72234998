"""Global batches from prepared data: every host plans the same packing and feeds its own rows.

Order: the examples of all sources (config order) form one index space; epoch ``e`` visits them
in the permutation drawn from ``(seed, e)`` -- every source shuffled together and reshuffled
each epoch, the study's ``concat`` mixture. Each example becomes its segments: corpus documents
windows of ``seq_len + 1`` tokens overlapping by one, conversations truncated or dropped per
``data.overlong`` (as ``examples.to_segments`` does for raw sources).

Packing: the segments fill the ``batch_size`` rows of a global batch best-fit (the row with the
least room that still fits), in stream order; a segment that fits nowhere is carried to the
next batch, which takes the carried ones first; a batch closes when every row is full or
:data:`CARRY` segments wait. The plan needs only lengths (the prepared index), so every host
computes it identically -- and with it the exact number of batches of ``data.epochs`` passes,
for the learning-rate schedule -- and reads only the examples of its own rows. The state
(epoch, position, carried segments, counters) is global: a run resumes on any number of hosts,
and all hosts run out of data at the same step.
"""

from __future__ import annotations

import bisect
import copy
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grain
import numpy as np

from basque_jax.data.config import DataConfig
from basque_jax.data.prepared import PreparedSource, decode_example
from basque_jax.data.stats import STATE_KEY

CARRY = 64  # segments that may wait for a later batch
NOTES = {1: "split", 2: "truncated", 3: "dropped_overlong"}


class Planner:
    """The packing plan of prepared sources (see module docstring), on lengths alone."""

    def __init__(self, sources: list[PreparedSource], cfg: DataConfig):
        self.names = [s.name for s in sources]
        self.offsets = np.cumsum([0] + [len(s.index) for s in sources])
        index = np.concatenate([s.index for s in sources]).astype(np.int64)
        corpus = np.concatenate([np.full(len(s.index), s.is_corpus) for s in sources])
        self.rows, self.seq_len = cfg.batch_size, cfg.seq_len
        self.seed, self.epochs = cfg.seed, cfg.epochs
        # Per example, as Python lists (the plan walks millions of them): source, number of
        # windows, length of the last one, and what happened to it (see NOTES).
        n, L = index[:, 0] - 1, cfg.seq_len
        long = n > L
        dropped = long & ~corpus & ((cfg.overlong == "drop") | (index[:, 1] > L))
        windows = np.where(long & corpus, -(-n // L), 1) * ~dropped
        last = np.where(long & corpus, n - (windows - 1) * L, np.minimum(n, L))
        note = np.select([dropped, long & corpus, long], [3, 1, 2], 0)
        self._source = np.repeat(np.arange(len(sources)), np.diff(self.offsets)).tolist()
        self._windows, self._last, self._note = windows.tolist(), last.tolist(), note.tolist()
        self._order: tuple[int, list[int]] | None = None

    @property
    def num_examples(self) -> int:
        return len(self._windows)

    def initial_state(self) -> dict[str, Any]:
        counts = {n: {"split": 0, "truncated": 0, "dropped_overlong": 0, "segments": 0}
                  for n in self.names}
        return {"epoch": 0, "position": 0, "window": 0, "carry": [], "batches": 0,
                "counts": counts}

    def order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = (epoch, rng.permutation(self.num_examples).tolist())
        return self._order[1]

    def windows(self, example: int) -> list[int]:
        """Positions of each segment of ``example`` (empty: dropped as over-long)."""
        n = self._windows[example]
        return [self.seq_len] * (n - 1) + [self._last[example]] if n else []

    def _next(self, state: dict[str, Any]) -> tuple[int, int, int] | None:
        """The next segment ``(example, window, length)`` of the stream; advances ``state``."""
        while self.epochs is None or state["epoch"] < self.epochs:
            if state["position"] >= self.num_examples:
                state["epoch"], state["position"], state["window"] = state["epoch"] + 1, 0, 0
                continue
            example = self.order(state["epoch"])[state["position"]]
            w, n = state["window"], self._windows[example]
            counts = state["counts"][self.names[self._source[example]]]
            if w == 0 and self._note[example]:
                counts[NOTES[self._note[example]]] += 1
            if w >= n:
                state["position"], state["window"] = state["position"] + 1, 0
                continue
            state["window"] = w + 1
            counts["segments"] += 1
            return example, w, self.seq_len if w + 1 < n else self._last[example]
        return None

    def plan_batch(self, state: dict[str, Any]
                   ) -> tuple[list[tuple[int, int, int, int, int]], dict[str, Any]] | None:
        """``(placements, next state)`` of the next global batch -- placements as
        ``(row, offset, example, window, length)`` -- or None when the data is exhausted."""
        state = copy.deepcopy(state)
        frees = [(self.seq_len, r) for r in range(self.rows)]  # sorted (room, row)
        placed: list[tuple[int, int, int, int, int]] = []
        carry: list[list[int]] = []

        def place(example: int, window: int, length: int) -> None:
            i = bisect.bisect_left(frees, (length, -1))
            if i == len(frees):
                carry.append([example, window, length])
                return
            room, row = frees.pop(i)
            placed.append((row, self.seq_len - room, example, window, length))
            if room > length:
                bisect.insort(frees, (room - length, row))

        for example, window, length in state["carry"]:
            place(example, window, length)
        while frees and len(carry) < CARRY:
            segment = self._next(state)
            if segment is None:
                break
            place(*segment)
        if not placed:
            return None
        state["carry"], state["batches"] = carry, state["batches"] + 1
        return placed, state

    def count_batches(self) -> int:
        """Batches in ``data.epochs`` passes (the exact length of the run)."""
        if self.epochs is None:
            raise ValueError("count_batches needs data.epochs")
        state, n = self.initial_state(), 0
        while (step := self.plan_batch(state)) is not None:
            state, n = step[1], n + 1
        return n


class PreparedBatches(grain.IterDataset):
    """This host's rows of every global batch (``grain`` dataset; global state)."""

    def __init__(self, planner: Planner, sources: list[PreparedSource], *, process_index: int,
                 process_count: int, read_threads: int = 8):
        super().__init__()
        if planner.rows % process_count:
            raise ValueError(f"data.batch_size {planner.rows} is not divisible by "
                             f"{process_count} processes")
        self.planner = planner
        self.readers = [grain.sources.ArrayRecordDataSource([str(p) for p in s.shards])
                        for s in sources]
        self.manifests = {s.name: s.manifest for s in sources}
        per_host = planner.rows // process_count
        self.row_range = (process_index * per_host, (process_index + 1) * per_host)
        self.read_threads = read_threads

    def __iter__(self) -> _PreparedIterator:
        return _PreparedIterator(self)

    def __str__(self) -> str:
        return f"PreparedBatches(rows {self.row_range} of {self.planner.rows})"

    def read(self, example: int) -> tuple[np.ndarray, np.ndarray]:
        k = int(np.searchsorted(self.planner.offsets, example, side="right")) - 1
        return decode_example(self.readers[k][example - int(self.planner.offsets[k])])


class _PreparedIterator(grain.DatasetIterator):
    def __init__(self, parent: PreparedBatches):
        super().__init__()
        self._ds = parent
        self._state = parent.planner.initial_state()
        self._pool = ThreadPoolExecutor(max(1, parent.read_threads))

    def __next__(self) -> dict[str, np.ndarray]:
        ds = self._ds
        step = ds.planner.plan_batch(self._state)
        if step is None:
            raise StopIteration
        placed, self._state = step
        lo, hi = ds.row_range
        mine = [p for p in placed if lo <= p[0] < hi]
        examples = sorted({p[2] for p in mine})
        tokens = dict(zip(examples, self._pool.map(ds.read, examples), strict=True))
        L = ds.planner.seq_len
        batch = {k: np.zeros((hi - lo, L), np.int32)
                 for k in ("input_ids", "targets", "positions", "segment_ids")}
        batch["loss_mask"] = np.zeros((hi - lo, L), np.float32)
        segment_of_row = np.zeros(hi - lo, np.int32)
        for row, offset, example, window, length in sorted(mine, key=lambda p: (p[0], p[1])):
            ids, mask = tokens[example]
            start = window * L
            r, cols = row - lo, slice(offset, offset + length)
            segment_of_row[r] += 1
            batch["input_ids"][r, cols] = ids[start:start + length]
            batch["targets"][r, cols] = ids[start + 1:start + length + 1]
            batch["loss_mask"][r, cols] = mask[start + 1:start + length + 1]
            batch["positions"][r, cols] = np.arange(length)
            batch["segment_ids"][r, cols] = segment_of_row[r]
        return batch

    def get_state(self) -> dict[str, Any]:
        stats = {}
        for name, counts in self._state["counts"].items():
            m = self._ds.manifests[name]
            stats[name] = {"records": m["records"], "valid": m["examples"], "bad": m["bad"],
                           "reasons": dict(m["reasons"]), "first_bad": list(m["first_bad"]),
                           **counts}
        return {"global": True, **copy.deepcopy(self._state), STATE_KEY: stats}

    def set_state(self, state: dict[str, Any]) -> None:
        self._state = {k: copy.deepcopy(v) for k, v in state.items()
                       if k not in ("global", STATE_KEY)}


def batches_per_run(cfg: DataConfig, sources: list[PreparedSource]) -> int:
    """:meth:`Planner.count_batches`, cached beside the prepared data (the plan of a big corpus
    takes a while): keyed by everything the packing depends on."""
    import hashlib
    import json
    from pathlib import Path

    key = json.dumps([[s.manifest["fingerprints"], s.manifest["examples"], str(s.folder)]
                      for s in sources] + [cfg.seq_len, cfg.batch_size, cfg.seed, cfg.epochs,
                                           cfg.overlong, CARRY], sort_keys=True)
    path = Path(cfg.prepared) / "plans" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        return int(json.loads(path.read_text())["batches"])
    n = Planner(sources, cfg).count_batches()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"batches": n, "key": json.loads(key)}) + "\n")
    except OSError:  # a read-only mount: recomputed next time
        pass
    return n
