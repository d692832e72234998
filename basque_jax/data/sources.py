"""Sources: read raw records from files, the Hugging Face hub, ArrayRecord or TFDS.

Every record comes out as a ``RawRecord(source, where, payload)``: ``where`` names the file and
line (or index) for error messages; ``payload`` is the undecoded JSON ``bytes`` of a JSONL line
or ArrayRecord record, or a ``dict`` (JSON array item, Parquet row, hub or TFDS example, or
``{text_field: bytes}`` for plain text). Decoding and validation happen later (``formats.py``)
so that bad records are counted, not fatal.

Random-access sources become ``grain.MapDataset`` (globally shuffled, sliced per host and per
worker); the Hugging Face hub and TFDS readers are in ``hub.py``.
"""

from __future__ import annotations

import glob as globlib
import json
import mmap
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import grain
import numpy as np

from basque_jax.data.config import SourceConfig
from basque_jax.data.stats import DataError
from basque_jax.errors import InputNotFound, MissingDependency

_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
    ".arrayrecord": "array_record",
    ".array_record": "array_record",
}


class RawRecord(NamedTuple):
    """One undecoded record and where it came from."""

    source: str
    where: str
    payload: bytes | dict


def is_remote(path: str) -> bool:
    """True for fsspec URLs such as ``gs://bucket/x.jsonl`` (``file://`` counts as local)."""
    return "://" in path and not path.startswith("file://")


def expand_paths(patterns: Sequence[str], source: str) -> list[str]:
    """Expands globs (local or fsspec); a pattern that matches nothing is an error."""
    out: list[str] = []
    for pattern in patterns:
        if is_remote(pattern):
            fs, _ = _fsspec_fs(pattern)
            protocol = pattern.split("://", 1)[0]
            if any(c in pattern for c in "*?["):
                found = sorted(f"{protocol}://{p}" for p in fs.glob(pattern))
            else:
                found = [pattern] if fs.exists(pattern) else []
        else:
            local = pattern.removeprefix("file://")
            found = sorted(globlib.glob(local)) if any(c in local for c in "*?[") else [local]
            found = [f for f in found if os.path.isfile(f)]
        if not found:
            raise InputNotFound(f"source {source}: no file matches {pattern!r}")
        out.extend(found)
    return out


def _fsspec_fs(path: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError as e:  # pragma: no cover - fsspec is a core dependency
        raise MissingDependency(f"reading {path} needs fsspec") from e
    try:
        return fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as e:
        raise MissingDependency(
            f"reading {path!r} needs the fsspec filesystem for its protocol "
            f"(e.g. `pip install gcsfs` for gs://): {e}"
        ) from e


def file_format(path: str, configured: str) -> str:
    """The format of ``path``: ``configured`` unless ``auto``, else from the extension."""
    if configured != "auto":
        return configured
    for ext, fmt in _EXTENSIONS.items():
        if path.endswith(ext):
            return fmt
    raise DataError(f"cannot infer the format of {path!r} from its extension; set `format:`")


class _ByteFile:
    """Byte ranges of one file, opened lazily per process (mmap locally, fsspec remotely)."""

    def __init__(self, path: str):
        self.path = path
        self._mm: mmap.mmap | bytes | None = None
        self._remote = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def read(self, start: int, end: int) -> bytes:
        if is_remote(self.path):
            with self._lock:
                if self._remote is None:
                    fs, p = _fsspec_fs(self.path)
                    self._remote = fs.open(p, "rb")
                self._remote.seek(start)
                return self._remote.read(end - start)
        if self._mm is None:
            with self._lock:
                if self._mm is None:
                    self._mm = _map_file(self.path)
        return self._mm[start:end]

    def chunks(self, size: int = 1 << 24) -> Iterator[bytes]:
        if is_remote(self.path):
            fs, p = _fsspec_fs(self.path)
            f = fs.open(p, "rb")
        else:
            f = open(self.path, "rb")  # noqa: SIM115
        with f:
            while chunk := f.read(size):
                yield chunk


def _map_file(path: str) -> mmap.mmap | bytes:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _line_offsets(bf: _ByteFile) -> tuple[np.ndarray, np.ndarray]:
    """Start/end byte offsets of every line (a final line without newline included)."""
    newlines, base, last = [], 0, b""
    for chunk in bf.chunks():
        newlines.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + base)
        base += len(chunk)
        last = chunk
    nl = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    ends = np.concatenate([nl, [base]]).astype(np.int64)
    if base == 0 or last.endswith(b"\n"):  # no text after the final newline
        starts, ends = starts[:-1], ends[:-1]
    return starts, ends


class LineFile:
    """Random access to the lines of a JSONL or text file.

    The payload is the line's bytes (JSONL), or ``{text_field: bytes}`` for plain text, where
    empty lines are separators rather than records.
    """

    def __init__(self, path: str, source: str, text_field: str | None = None):
        self.source = source
        self._text_field = text_field
        self._file = _ByteFile(path)
        starts, ends = _line_offsets(self._file)
        self._lines: np.ndarray | None = None  # line numbers, when some lines are skipped
        if text_field is not None:
            keep = ends - starts > 0
            for i in np.flatnonzero(ends - starts == 1):
                keep[i] = self._file.read(int(starts[i]), int(ends[i])) != b"\r"
            if not keep.all():
                self._lines = np.flatnonzero(keep) + 1
                starts, ends = starts[keep], ends[keep]
        self._starts, self._ends = starts, ends

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i: int) -> RawRecord:
        data = self._file.read(int(self._starts[i]), int(self._ends[i])).rstrip(b"\r")
        payload = data if self._text_field is None else {self._text_field: data}
        line = i + 1 if self._lines is None else self._lines[i]
        return RawRecord(self.source, f"{self._file.path}:{line}", payload)


class InMemoryRecords:
    """Records already decoded into memory (JSON arrays, text paragraphs, whole files)."""

    def __init__(self, records: list[tuple[str, bytes | str | dict]], source: str):
        self.source = source
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> RawRecord:
        where, payload = self._records[i]
        return RawRecord(self.source, where, payload)


def _read_all(path: str) -> bytes:
    return b"".join(_ByteFile(path).chunks())


def _json_file(path: str, source: str) -> LineFile | InMemoryRecords:
    data = _read_all(path)
    try:
        value = json.loads(data)
    except UnicodeDecodeError as e:
        raise DataError(f"source {source}: {path} is not valid UTF-8: {e}") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines in a .json file
            return LineFile(path, source)
        raise DataError(f"source {source}: {path} is not valid JSON: {e}") from None
    if not isinstance(value, list):
        raise DataError(f"source {source}: {path} must hold a JSON array of records")
    return InMemoryRecords([(f"{path}[{i}]", r) for i, r in enumerate(value)], source)


def _text_file(path: str, unit: str, field: str, source: str) -> LineFile | InMemoryRecords:
    if unit == "line":
        return LineFile(path, source, text_field=field)
    data = _read_all(path)
    if unit == "file":
        return InMemoryRecords([(path, {field: data})] if data else [], source)
    records, para, first = [], [], 0
    for n, line in enumerate(data.split(b"\n") + [b""], start=1):
        if line.strip():
            first = first or n
            para.append(line.rstrip(b"\r"))
        elif para:
            records.append((f"{path}:{first}", {field: b"\n".join(para)}))
            para, first = [], 0
    return InMemoryRecords(records, source)


class ParquetRecords:
    """Rows of a Parquet file as dicts (table loaded lazily, once per process)."""

    def __init__(self, path: str, source: str):
        self.source = source
        self.path = path
        self._table = None
        self._len = self._metadata_rows()

    def _metadata_rows(self) -> int:
        import pyarrow.parquet as pq

        if is_remote(self.path):
            fs, p = _fsspec_fs(self.path)
            with fs.open(p, "rb") as f:
                return pq.ParquetFile(f).metadata.num_rows
        return pq.ParquetFile(self.path).metadata.num_rows

    def __getstate__(self) -> dict:
        return {"path": self.path, "source": self.source, "_len": self._len, "_table": None}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> RawRecord:
        if self._table is None:
            import pyarrow.parquet as pq

            if is_remote(self.path):
                fs, p = _fsspec_fs(self.path)
                with fs.open(p, "rb") as f:
                    self._table = pq.read_table(f)
            else:
                self._table = pq.read_table(self.path)
        row = {c: self._table.column(c)[i].as_py() for c in self._table.column_names}
        return RawRecord(self.source, f"{self.path}[row {i}]", row)


class ArrayRecordRecords:
    """Records of one ArrayRecord file; each record holds a UTF-8 JSON object."""

    def __init__(self, path: str, source: str):
        self.source = source
        self.path = path
        self._ds = grain.sources.ArrayRecordDataSource([path])

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> RawRecord:
        return RawRecord(self.source, f"{self.path}#{i}", self._ds[i])


def write_array_record(records: Sequence[dict], path: str) -> None:
    """Writes dicts as JSON records to an ArrayRecord file (the format read back here)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(path, "group_size:1")
    for r in records:
        writer.write(json.dumps(r, ensure_ascii=False).encode())
    writer.close()


def _file_sources(cfg: SourceConfig) -> list[Any]:
    out = []
    for path in expand_paths(cfg.paths, cfg.name):
        fmt = file_format(path, cfg.format)
        if fmt == "jsonl":
            out.append(LineFile(path, cfg.name))
        elif fmt == "json":
            out.append(_json_file(path, cfg.name))
        elif fmt == "text":
            out.append(_text_file(path, cfg.text_unit, cfg.text_field, cfg.name))
        elif fmt == "parquet":
            out.append(ParquetRecords(path, cfg.name))
        elif fmt == "array_record":
            out.append(ArrayRecordRecords(path, cfg.name))
        else:  # pragma: no cover - guarded by the config Literal
            raise DataError(f"source {cfg.name}: unsupported format {fmt!r}")
    return out


def open_random_access(cfg: SourceConfig) -> grain.MapDataset:
    """A ``MapDataset[RawRecord]`` over every record of a non-streaming source."""
    from basque_jax.data.hub import IndexedRecords, load_hub, tfds_source

    if cfg.hf_dataset:
        parts = [IndexedRecords(load_hub(cfg, streaming=False), cfg.name)]
    elif cfg.tfds_name:
        parts = [tfds_source(cfg)]
    else:
        parts = _file_sources(cfg)
    parts = [p for p in parts if len(p)]
    if not parts:
        raise DataError(f"source {cfg.name}: no records (empty input)")
    datasets = [grain.MapDataset.source(p) for p in parts]
    ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.concatenate(datasets)
    if cfg.max_records is not None:
        ds = ds[: cfg.max_records]
    return ds
