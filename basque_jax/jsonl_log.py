"""JSON-lines logs (``metrics.jsonl``, ``samples.jsonl``) on local disks and object stores.

Locally each record is appended; object stores (``gs://``) cannot append, so the whole file
(a few kB) is rewritten on each write, starting from what an earlier run left there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from etils import epath


class JsonlLog:
    """Append JSON records to ``path`` (a local path or a ``gs://`` URI)."""

    def __init__(self, path: str | os.PathLike):
        self.path = epath.Path(path)
        self.remote = "://" in os.fspath(path)
        self._lines: list[str] | None = None

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.remote:
            with self.path.open("a") as f:
                f.write("".join(lines))
            return
        if self._lines is None:
            self._lines = self.path.read_text().splitlines(keepends=True) \
                if self.path.exists() else []
        self._lines += lines
        self.path.write_text("".join(self._lines))
