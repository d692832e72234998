"""Minimal, streaming safetensors reader and writer (no pickle, no framework, bfloat16 included).

Reading memory-maps the file, so slicing one layer or one device shard of a tensor touches only
those bytes. Writing takes the header up front and then the tensors one at a time, so a writer
never holds more than the tensor being written.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

from basque_jax.errors import UserError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(UserError):
    """A malformed or unsupported safetensors file."""


class SafetensorsFile:
    """Lazy view of one ``.safetensors`` file: ``keys()``, ``shape(k)``, ``dtype(k)``, ``get(k)``.

    Header and dtypes are checked on open; data is only mapped on first ``get``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > self.path.stat().st_size - 8:
                    raise SafetensorsError(f"header length {header_len} exceeds the file size")
                header = json.loads(f.read(header_len))
        except (OSError, SafetensorsError, struct.error, json.JSONDecodeError,
                UnicodeDecodeError) as e:
            raise SafetensorsError(f"{self.path}: not a readable safetensors file ({e})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries: dict[str, dict] = header
        self._data_start = 8 + header_len
        self._mmap: np.memmap | None = None
        for key, entry in header.items():
            if entry.get("dtype") not in DTYPES:
                raise SafetensorsError(f"{self.path}: tensor {key!r} has unsupported dtype "
                                       f"{entry.get('dtype')!r}")

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self):
        return iter(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        return DTYPES[self._entries[key]["dtype"]]

    def get(self, key: str) -> np.ndarray:
        """A read-only memory-mapped view of tensor ``key``."""
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        entry = self._entries[key]
        begin, end = entry["data_offsets"]
        raw = self._mmap[self._data_start + begin : self._data_start + end]
        return raw.view(self.dtype(key)).reshape(self.shape(key))

    def read(self, key: str) -> np.ndarray:
        """A fresh, writable copy of tensor ``key`` read with plain file reads.

        Unlike :meth:`get`, no mapping outlives the call, so streaming a large file tensor by
        tensor keeps the resident set at about one tensor.
        """
        entry = self._entries[key]
        begin, end = entry["data_offsets"]
        buf = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            got = f.readinto(buf)
        if got != len(buf):
            raise SafetensorsError(f"{self.path}: tensor {key!r} is truncated ({got} of "
                                   f"{len(buf)} bytes)")
        return np.frombuffer(buf, dtype=self.dtype(key)).reshape(self.shape(key))


def write_safetensors(
    path: str | Path,
    specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write tensors named by ``specs`` (name, shape, dtype), fetching each from ``produce``.

    The header is written first; each tensor is then produced, checked and written in turn.
    """
    specs = list(specs)
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype in specs:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in specs:
            array = np.ascontiguousarray(produce(name))
            if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                raise SafetensorsError(f"{path}: tensor {name!r} produced {array.shape} "
                                       f"{array.dtype}, header says {tuple(shape)} {dtype}")
            f.write(array.reshape(-1).view(np.uint8).data)
