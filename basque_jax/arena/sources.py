"""Where votes come from and go to: a database (URL or SQLite file), JSONL or Parquet files.

``read_outcomes(VOTES)`` gives the ``(model_a, model_b, winner)`` triples that ratings need,
from a database (oldest first), a JSONL file (``.jsonl``/``.json``, optionally ``.gz``: one
``{"model_a", "model_b", "winner"}`` object a line, other keys ignored -- so exports and the
study's ``HiTZ/ebaluatoia`` files read as they are) or a Parquet file. A malformed line is a
UserError naming ``file:line``. A vote of a model against itself carries no information and
is skipped and counted. ``export_votes`` writes every stored column as JSONL or Parquet.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from basque_jax.arena.store import VoteStore, database_url
from basque_jax.arena.votes import WINNERS, normalize_winner
from basque_jax.errors import UserError

SQLITE_MAGIC = b"SQLite format 3\x00"
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


@dataclass
class Outcomes:
    """Vote triples in order, with what was skipped and where they came from."""

    votes: list[tuple[str, str, str]]
    source: str
    skipped_self_pairs: int = 0


def source_kind(spec: str) -> str:
    """``database``, ``jsonl`` or ``parquet`` for a VOTES argument (UserError if neither)."""
    if "://" in spec:
        return "database"
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"{spec}: no such file (give a vote database, a .jsonl or a .parquet "
                        "file, or a database URL)")
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    with path.open("rb") as f:
        if f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC:
            return "database"
    raise UserError(f"{spec}: not an SQLite database, .jsonl or .parquet file")


def open_store(spec: str) -> VoteStore:
    """A read-only view of the vote database named by a URL or an SQLite file path."""
    if source_kind(spec) != "database":
        raise UserError(f"{spec}: expected a vote database (SQLite file or URL)")
    return VoteStore(database_url(spec), migrate=False)


def _triple(row: Any, where: str) -> tuple[str, str, str]:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("model_a", "model_b"):
        if not isinstance(row.get(key), str) or not row[key]:
            raise UserError(f"{where}: {key} must be a non-empty string, got {row.get(key)!r}")
    winner = normalize_winner(row.get("winner"))
    if winner is None:
        raise UserError(f"{where}: winner must be one of {list(WINNERS)}, got "
                        f"{row.get('winner')!r}")
    return row["model_a"], row["model_b"], winner


def _open_text(path: Path) -> IO[str]:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _jsonl_triples(path: Path) -> Iterator[tuple[str, str, str]]:
    with _open_text(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: invalid JSON ({e.msg})") from None
            yield _triple(row, where)


def _parquet_triples(path: Path) -> Iterator[tuple[str, str, str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["model_a", "model_b", "winner"])
    except (OSError, KeyError, ValueError) as e:  # pyarrow's errors for bad files/columns
        raise UserError(f"{path}: cannot read model_a, model_b, winner ({e})") from None
    for number, row in enumerate(table.to_pylist(), 1):
        yield _triple(row, f"{path}: row {number}")


def read_outcomes(spec: str) -> Outcomes:
    """The vote triples of a database, JSONL or Parquet source, in order."""
    kind = source_kind(spec)
    if kind == "database":
        store = open_store(spec)
        try:
            triples: Iterator[tuple[str, str, str]] = iter(store.outcomes())
            source = store.safe_url
        finally:
            store.close()
    elif kind == "jsonl":
        triples, source = _jsonl_triples(Path(spec)), spec
    else:
        triples, source = _parquet_triples(Path(spec)), spec
    votes, skipped = [], 0
    for a, b, winner in triples:
        if a == b:
            skipped += 1
        else:
            votes.append((a, b, winner))
    return Outcomes(votes, source, skipped)


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def export_votes(spec: str, out: str | Path) -> int:
    """Write every vote of the database ``spec`` to ``out`` (``.jsonl`` or ``.parquet``, all
    columns, timestamps as ISO 8601 UTC); returns the number of votes."""
    out = Path(out)
    if out.suffix.lower() not in (".jsonl", ".parquet"):
        raise UserError(f"{out}: the output must end in .jsonl or .parquet")
    store = open_store(spec)
    try:
        if out.suffix.lower() == ".jsonl":
            count = 0
            with out.open("w", encoding="utf-8") as f:
                for line in jsonl_lines(store):
                    f.write(line)
                    count += 1
            return count
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [{k: _plain(v) for k, v in row.items()} for row in store.iter_rows()]
        pq.write_table(pa.Table.from_pylist(rows), out)
        return len(rows)
    finally:
        store.close()


def jsonl_lines(store: VoteStore) -> Iterator[str]:
    """The votes of ``store`` as JSONL lines (the admin export route)."""
    for row in store.iter_rows():
        yield json.dumps({k: _plain(v) for k, v in row.items()}, ensure_ascii=False) + "\n"
