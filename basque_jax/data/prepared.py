"""Prepared data on disk: a run's sources tokenized once (``basque-jax prepare``) and read back.

Per source, ``<data.prepared>/<name>-<hash>/`` holds

* ``shard-00000-of-00012.array_record`` -- one record per training example (a source record
  that survived parsing, the chat template and the bad-record checks): ``uint32`` length,
  ``uint32`` token ids, ``uint8`` loss mask;
* ``shard-00000-of-00012.index.npy`` -- ``int32 [examples, 2]``: each example's length and its
  first trained position (>= 1), so the packing of a whole run is planned without reading a
  token;
* ``shard-00000-of-00012.json`` -- the shard's counts (records, examples, tokens, loss tokens,
  bad records by reason, the first offenders); written last, so it marks a finished shard;
* ``manifest.json`` -- the source's totals, its config, and the fingerprints of the tokenizer
  and chat template the tokens came from (a run with other ones is refused).

The folder name hashes every source field that changes the tokens, so editing a source makes
it "not prepared" instead of silently stale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from basque_jax.data.config import DataConfig, SourceConfig
from basque_jax.data.templates import make_chat_encoder
from basque_jax.data.tokenizer import Tokenizer
from basque_jax.errors import UserError

FORMAT = 1
MANIFEST = "manifest.json"
# Source fields that decide which records, and hence which tokens, a source has.
_CONTENT_FIELDS = ("kind", "path", "hf_dataset", "tfds_name", "subset", "split", "data_files",
                   "data_dir", "format", "text_unit", "text_field", "messages_field",
                   "max_records")


class NotPrepared(UserError):
    """Prepared data is missing, unfinished, or was made with another tokenizer/template."""


def source_dir(root: str | Path, source: SourceConfig) -> Path:
    """Where ``source`` is prepared under ``root``."""
    content = {f: getattr(source, f) for f in _CONTENT_FIELDS}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", source.name).strip("_")[:60] or "source"
    return Path(root) / f"{slug}-{digest}"


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def encode_example(ids: list[int], mask: list[int]) -> bytes:
    n = len(ids)
    return (n.to_bytes(4, "little") + np.asarray(ids, "<u4").tobytes()
            + np.asarray(mask, np.uint8).tobytes())


def decode_example(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    n = int.from_bytes(data[:4], "little")
    ids = np.frombuffer(data, "<u4", n, offset=4).astype(np.int32)
    mask = np.frombuffer(data, np.uint8, n, offset=4 + 4 * n)
    return ids, mask


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    text = json.dumps([tokenizer._json, tokenizer.bos_token, tokenizer.eos_token])
    return hashlib.sha256(text.encode()).hexdigest()


def template_fingerprint(cfg: DataConfig, tokenizer: Tokenizer) -> str:
    """What decides how conversations become tokens: the template and its settings."""
    encoder = make_chat_encoder(tokenizer, cfg.chat_template, date_string=cfg.chat_date,
                                system_prompt=cfg.system_prompt)
    parts = [type(encoder).__name__, encoder.template, cfg.chat_date, cfg.system_prompt]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def fingerprints(cfg: DataConfig, tokenizer: Tokenizer) -> dict[str, str]:
    return {"tokenizer": tokenizer_fingerprint(tokenizer),
            "chat_template": template_fingerprint(cfg, tokenizer)}


def source_record(source: SourceConfig) -> dict[str, Any]:
    """The source's config as the manifest records it."""
    return {k: v for k, v in dataclasses.asdict(source).items() if k != "weight"}


@dataclass
class PreparedSource:
    """One prepared source: its manifest, shard files and per-example index."""

    name: str
    folder: Path
    manifest: dict[str, Any]
    shards: list[Path]
    index: np.ndarray  # int32 [examples, 2]: length, first trained position

    @property
    def is_corpus(self) -> bool:
        return self.manifest["source"]["kind"] == "corpus"


def open_prepared(cfg: DataConfig, tokenizer: Tokenizer) -> list[PreparedSource]:
    """Every source of ``cfg`` as prepared under ``cfg.prepared``, checked against the
    current tokenizer and chat template; :class:`NotPrepared` naming what to run otherwise."""
    assert cfg.prepared is not None
    want = fingerprints(cfg, tokenizer)
    out = []
    for source in cfg.sources:
        folder = source_dir(cfg.prepared, source)
        path = folder / MANIFEST
        if not path.is_file():
            raise NotPrepared(f"{path}: source {source.name!r} is not prepared (or its config "
                              "changed since); run basque-jax prepare with this config first")
        manifest = json.loads(path.read_text())
        for key, value in want.items():
            if manifest["fingerprints"].get(key) != value:
                raise NotPrepared(f"{path}: prepared with another {key.replace('_', ' ')} than "
                                  f"this run's (data.tokenizer / data.chat_template, chat_date, "
                                  f"system_prompt); run basque-jax prepare again")
        shards = [folder / f"{s}.array_record" for s in manifest["shards"]]
        index = np.concatenate([np.load(folder / f"{s}.index.npy") for s in manifest["shards"]])
        if len(index) != manifest["examples"]:
            raise NotPrepared(f"{path}: {len(index)} indexed examples, the manifest says "
                              f"{manifest['examples']}; prepare again")
        out.append(PreparedSource(source.name, folder, manifest, shards, index))
    return out


def epoch_tokens(sources: list[PreparedSource]) -> int:
    """Trained positions in one pass over the prepared sources (targets, before packing)."""
    return int(sum(int(np.sum(s.index[:, 0] - 1)) for s in sources))
