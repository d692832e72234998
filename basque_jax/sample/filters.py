"""Quality filters for generated and translated conversations, with a per-filter count report.

Applied in order; a record is counted under the first filter that removes it:

1. ``status``        -- the pipeline marked the record unusable (truncated, too long, ...);
2. ``length``        -- a turn shorter than ``min_chars`` or longer than ``max_chars``;
3. ``repetition``    -- a turn whose word n-grams repeat too much (degenerate loops);
4. ``translation_task`` -- (optional) the user asks for a translation (the Latxa Instruct study
   found such tasks harmful once the data set itself is machine-translated);
5. ``language``      -- a turn not identified as ``language`` by lingua (a maintained detector
   with Basque; restricted to ``language_candidates`` to stay fast and small);
6. ``exact_duplicate`` -- same normalised dedup text (NFKC, case-folded, punctuation and spaces
   collapsed) as an earlier record;
7. ``near_duplicate`` -- MinHash (word shingles) Jaccard above ``near_dedup_threshold`` with an
   earlier kept record, found with LSH (datasketch).

Records follow the study's schema ``{"conversations": [{"role", "content"}, ...]}``
(``messages`` is accepted too).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from basque_jax.errors import ConfigError, InputNotFound
from basque_jax.yaml_config import build

FILTER_ORDER = ("status", "length", "repetition", "translation_task", "language",
                "exact_duplicate", "near_duplicate")

# Requests to translate, in English, Spanish and Basque ("itzuli ... ingelesera").
DEFAULT_TRANSLATION_PATTERNS = [
    r"\btranslat(e|es|ed|ing|ion|ions)\b",
    r"\btradu(c|z)(e|es|en|ir|ción|ciones|ca|zca|zcas)\b",
    r"\bitzulpen\w*",
    r"\bitzul(i|tzen|tzeko|tzea|ezazu|zazu|du)\b.{0,60}\b(euskar|ingeles|gaztelani|espainier|"
    r"frantses|aleman|italier|katalan|portuges|txinera|japonier|errusier)\w*ra\b",
    r"\b(euskar|ingeles|gaztelani|espainier|frantses|aleman|italier|katalan|portuges)\w*ra\b"
    r".{0,60}\bitzul\w*",
]
DEFAULT_LANGUAGE_CANDIDATES = ["eu", "es", "en", "fr", "ca", "pt", "it", "de"]


@dataclass
class FilterConfig:
    """Which filters run and their thresholds (see the module docstring).

    length/repetition/language apply to every turn whose role is in ``roles``.
    ``dedup_on``: ``user`` (the first user turn, as Magpie dedups instructions) or
    ``conversation`` (all turns).
    """

    enabled: bool = True
    keep_status: list[str] = field(default_factory=lambda: ["ok"])
    roles: list[str] = field(default_factory=lambda: ["user", "assistant"])
    min_chars: int = 1
    max_chars: int = 32_000
    ngram: int = 3
    max_repeated_ngrams: float = 0.3
    language: str | None = "eu"
    language_candidates: list[str] | None = field(
        default_factory=lambda: list(DEFAULT_LANGUAGE_CANDIDATES))
    min_language_confidence: float = 0.5
    language_min_chars: int = 20
    drop_translation_tasks: bool = True
    translation_patterns: list[str] = field(
        default_factory=lambda: list(DEFAULT_TRANSLATION_PATTERNS))
    exact_dedup: bool = True
    near_dedup: bool = True
    near_dedup_threshold: float = 0.8
    num_perm: int = 128
    shingle: int = 3
    dedup_on: Literal["user", "conversation"] = "user"

    def __post_init__(self) -> None:
        checks = [
            (self.min_chars >= 0, "min_chars", "must be >= 0"),
            (self.max_chars >= self.min_chars, "max_chars", "must be >= min_chars"),
            (self.ngram >= 1, "ngram", "must be >= 1"),
            (0 < self.max_repeated_ngrams <= 1, "max_repeated_ngrams", "must be in (0, 1]"),
            (0 <= self.min_language_confidence <= 1, "min_language_confidence",
             "must be in [0, 1]"),
            (0 < self.near_dedup_threshold <= 1, "near_dedup_threshold", "must be in (0, 1]"),
            (self.num_perm >= 16, "num_perm", "must be >= 16"),
            (self.shingle >= 1, "shingle", "must be >= 1"),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ConfigError(f"filters.{key}: {msg}, got {getattr(self, key)!r}")
        for i, pattern in enumerate(self.translation_patterns):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"filters.translation_patterns[{i}]: {e}") from None
        for code in [self.language, *(self.language_candidates or [])]:
            if code is not None:
                _lingua_language(code, "filters.language")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "filters") -> FilterConfig:
        return build(cls, d, where)


def _lingua_language(code: str, where: str):
    from lingua import IsoCode639_1, Language

    try:
        return Language.from_iso_code_639_1(IsoCode639_1.from_str(code))
    except ValueError:
        raise ConfigError(f"{where}: {code!r} is not an ISO 639-1 code lingua knows") from None


def turns(record: dict[str, Any]) -> list[dict[str, str]]:
    """The record's turns (``conversations`` or ``messages``)."""
    conv = record.get("conversations", record.get("messages"))
    if not isinstance(conv, list):
        raise ValueError("record has no 'conversations' list")
    return conv


_PUNCT = re.compile(r"[\W_]+", re.UNICODE)


def normalise(text: str) -> str:
    """NFKC, case-folded, punctuation removed, whitespace collapsed (for exact dedup)."""
    return " ".join(_PUNCT.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split())


def repeated_ngram_fraction(text: str, n: int) -> float:
    """Share of word n-grams that repeat an earlier one (0 when fewer than n words)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


class Filters:
    """Stateful filter chain (dedup remembers what it kept): ``keep(record) -> reason|None``."""

    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg
        self.counts = {name: 0 for name in FILTER_ORDER}
        self.seen = 0
        self.kept = 0
        self._hashes: set[str] = set()
        self._patterns = [re.compile(p, re.IGNORECASE) for p in cfg.translation_patterns]
        self._detector = None
        self._target = None
        self._lsh = None
        if cfg.language:
            from lingua import LanguageDetectorBuilder

            self._target = _lingua_language(cfg.language, "filters.language")
            if cfg.language_candidates:
                langs = {_lingua_language(c, "filters.language_candidates")
                         for c in cfg.language_candidates} | {self._target}
                builder = LanguageDetectorBuilder.from_languages(*langs)
            else:
                builder = LanguageDetectorBuilder.from_all_languages()
            self._detector = builder.build()
        if cfg.near_dedup:
            from datasketch import MinHashLSH

            self._lsh = MinHashLSH(threshold=cfg.near_dedup_threshold, num_perm=cfg.num_perm)

    # ------------------------------------------------------------------ single checks
    def _texts(self, record: dict[str, Any]) -> list[str]:
        return [t.get("content", "") for t in turns(record) if t.get("role") in self.cfg.roles]

    def is_translation_task(self, record: dict[str, Any]) -> bool:
        users = [t.get("content", "") for t in turns(record) if t.get("role") == "user"]
        return any(p.search(u) for p in self._patterns for u in users[:1])

    def is_language(self, text: str) -> bool:
        """Whether lingua identifies ``text`` as the configured language, confidently."""
        assert self._detector is not None
        values = self._detector.compute_language_confidence_values(text)
        if not values:
            return False
        best = values[0]
        return best.language == self._target and best.value >= self.cfg.min_language_confidence

    def _dedup_text(self, record: dict[str, Any]) -> str:
        conv = turns(record)
        if self.cfg.dedup_on == "user":
            users = [t.get("content", "") for t in conv if t.get("role") == "user"]
            return users[0] if users else ""
        return "\n".join(t.get("content", "") for t in conv)

    def _minhash(self, text: str):
        from datasketch import MinHash

        words = normalise(text).split()
        n = self.cfg.shingle
        shingles = {" ".join(words[i:i + n]) for i in range(max(len(words) - n + 1, 1))}
        mh = MinHash(num_perm=self.cfg.num_perm, seed=1)
        mh.update_batch([s.encode("utf-8") for s in shingles])
        return mh

    # ------------------------------------------------------------------ chain
    def reason(self, record: dict[str, Any]) -> str | None:
        """The first filter that removes ``record`` (None: keep); updates dedup state."""
        cfg = self.cfg
        if "status" in record and record["status"] not in cfg.keep_status:
            return "status"
        texts = self._texts(record)
        if not texts or any(not cfg.min_chars <= len(t.strip()) <= cfg.max_chars
                            for t in texts):
            return "length"
        if any(repeated_ngram_fraction(t, cfg.ngram) > cfg.max_repeated_ngrams for t in texts):
            return "repetition"
        if cfg.drop_translation_tasks and self.is_translation_task(record):
            return "translation_task"
        if self._detector is not None and any(
                not self.is_language(t) for t in texts if len(t.strip()) >= cfg.language_min_chars):
            return "language"
        dedup = self._dedup_text(record)
        if cfg.exact_dedup:
            digest = hashlib.sha1(normalise(dedup).encode("utf-8")).hexdigest()
            if digest in self._hashes:
                return "exact_duplicate"
            self._hashes.add(digest)
        if self._lsh is not None:
            mh = self._minhash(dedup)
            if self._lsh.query(mh):
                return "near_duplicate"
            self._lsh.insert(str(self.seen), mh)
        return None

    def keep(self, record: dict[str, Any]) -> bool:
        """Apply the chain, count the outcome; True when ``record`` survives."""
        self.seen += 1
        why = self.reason(record)
        if why is None:
            self.kept += 1
            return True
        self.counts[why] += 1
        return False

    def __call__(self, records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        return (r for r in records if self.keep(r))

    def report(self) -> dict[str, Any]:
        """``{"input", "kept", "removed": {filter: count}}`` (filters in application order)."""
        return {"input": self.seen, "kept": self.kept, "removed": dict(self.counts)}


def filter_files(inputs: Iterable[str | Path], output: str | Path, cfg: FilterConfig,
                 report_path: str | Path | None = None) -> dict[str, Any]:
    """Filter JSONL ``inputs`` (files or shard folders) into ``output``; write and return the
    report (default path: ``<output>.report.json``)."""
    from basque_jax.sample.shards import read_records, shard_paths

    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        found = shard_paths(p) if p.is_dir() else sorted(p.parent.glob(p.name))
        if not found:
            raise InputNotFound(f"{item}: no JSONL files (or shard-*.jsonl in a folder)")
        paths.extend(found)
    chain = Filters(cfg)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    records = sorted(read_records(paths), key=lambda r: r.get("index", 0))
    with open(tmp, "w", encoding="utf-8") as f:
        for record in chain(records):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(out)
    report = {**chain.report(), "inputs": [str(p) for p in paths], "output": str(out)}
    rpath = Path(report_path) if report_path else out.with_name(out.name + ".report.json")
    rpath.write_text(json.dumps(report, indent=2) + "\n")
    return report
