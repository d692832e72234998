"""Resumable JSONL output: one shard per process, one atomic append per record.

Every record carries its work ``index``. A job writes to ``shard-{p:05d}-of-{n:05d}.jsonl`` in
its output folder with one ``write()`` of a whole line per record (``O_APPEND``), so a killed
job leaves at most one partial last line, which the next start cuts off. Restarting reads back
the indices present in *every* shard of the folder and works only on the rest, so the output
has no duplicate and no gap even when the number of processes changes between runs. Records
must be reproducible from their index alone (per-index seeds) for a resumed run to equal an
uninterrupted one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

SHARD_GLOB = "shard-*-of-*.jsonl"


def shard_path(directory: str | os.PathLike, process_index: int, process_count: int) -> Path:
    """This process's shard file."""
    return Path(directory) / f"shard-{process_index:05d}-of-{process_count:05d}.jsonl"


def shard_paths(directory: str | os.PathLike) -> list[Path]:
    """Every shard in ``directory`` (sorted)."""
    return sorted(Path(directory).glob(SHARD_GLOB))


def _complete_lines(path: Path) -> tuple[list[bytes], int]:
    """Complete (newline-terminated) lines and the byte length they cover."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    return data[:end].splitlines(), end


def read_records(paths: Iterable[str | os.PathLike]) -> Iterator[dict[str, Any]]:
    """Records of JSONL files, skipping a partial last line; ValueError naming file:line for a
    corrupt complete line."""
    for path in paths:
        lines, _ = _complete_lines(Path(path))
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON record ({e})") from None


def done_indices(directory: str | os.PathLike) -> set[int]:
    """Indices already written by any process into ``directory``."""
    return {int(r["index"]) for r in read_records(shard_paths(directory)) if "index" in r}


def todo_indices(total: int, done: set[int], process_index: int, process_count: int
                 ) -> list[int]:
    """This process's share (``i % count == index``) of ``range(total)`` not yet done."""
    return [i for i in range(process_index, total, process_count) if i not in done]


class ShardWriter:
    """Appends records to one shard; cuts a partial last line left by a killed run first.

    ``fsync_every``: call ``fsync`` after this many records (and on close), so at most that
    many records are lost on a machine crash (a killed process loses none that were written).
    """

    def __init__(self, directory: str | os.PathLike, process_index: int = 0,
                 process_count: int = 1, *, fsync_every: int = 64):
        self.path = shard_path(directory, process_index, process_count)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            _, end = _complete_lines(self.path)
            if end != self.path.stat().st_size:
                os.truncate(self.path, end)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.fsync_every = fsync_every
        self._unsynced = 0
        self.written = 0

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line with a single ``write`` call."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(line)
        while view:  # a regular-file write is whole in practice; loop for the contract
            view = view[os.write(self._fd, view):]
        self.written += 1
        self._unsynced += 1
        if self.fsync_every and self._unsynced >= self.fsync_every:
            os.fsync(self._fd)
            self._unsynced = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
