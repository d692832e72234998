"""Typed configuration of the data pipeline (embedded under ``data:`` in the run config).

``DataConfig.from_dict(d)`` builds it from plain YAML/JSON values and raises ``ConfigError``
naming the offending key (``data.sources[1].txt_field: unknown key``) for unknown keys, wrong
types or invalid values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from basque_jax.data.templates import check_chat_template_setting
from basque_jax.errors import ConfigError
from basque_jax.yaml_config import build

__all__ = ["ConfigError", "DataConfig", "SourceConfig"]

SourceKind = Literal["corpus", "chat", "instruction"]
FileFormat = Literal["auto", "jsonl", "json", "parquet", "text", "array_record"]
TextUnit = Literal["line", "paragraph", "file"]


@dataclass
class SourceConfig:
    """One data source. Exactly one of ``path``, ``hf_dataset`` or ``tfds_name`` is set.

    kind: record format -- ``corpus`` ``{"text"}``, ``chat`` ``{"messages"|"conversations"}``,
      ``instruction`` (``instruction``/``response`` or ``input``/``output`` pairs).
    path: local or fsspec (``gs://``) file, glob, or a list of them.
    hf_dataset: Hugging Face dataset name (or a builder such as ``json`` with ``data_files``).
    tfds_name: TFDS dataset read through ``tfds.data_source`` (random access, no TensorFlow).
    format: file format for ``path`` (``auto`` picks it from the extension).
    text_unit: for plain-text files, one record per line, blank-line paragraph or whole file.
    weight: mixing weight (``mixture: weighted`` only).
    max_records: keep only the first N records of the source (smoke runs, tests).
    """

    kind: SourceKind
    path: str | list[str] | None = None
    hf_dataset: str | None = None
    tfds_name: str | None = None
    name: str = ""
    subset: str | None = None
    split: str = "train"
    data_files: str | list[str] | None = None
    data_dir: str | None = None
    streaming: bool = False
    format: FileFormat = "auto"
    text_unit: TextUnit = "line"
    weight: float = 1.0
    text_field: str = "text"
    messages_field: str | None = None
    max_records: int | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("path", "hf_dataset", "tfds_name") if getattr(self, k)]
        if len(given) != 1:
            raise ConfigError(
                f"source {self.name or '?'}: set exactly one of path, hf_dataset, tfds_name "
                f"(got {given or 'none'})"
            )
        if not self.name:
            self.name = str(self.hf_dataset or self.tfds_name or _first(self.path))
            if self.subset:
                self.name += f"/{self.subset}"
        if self.weight <= 0:
            raise ConfigError(f"source {self.name}: weight must be > 0, got {self.weight}")
        if self.max_records is not None and self.max_records <= 0:
            raise ConfigError(f"source {self.name}: max_records must be > 0")
        if self.streaming and not self.hf_dataset:
            raise ConfigError(f"source {self.name}: streaming applies to hf_dataset sources only")

    @property
    def paths(self) -> list[str]:
        """``path`` as a list."""
        if self.path is None:
            return []
        return [self.path] if isinstance(self.path, str) else list(self.path)


@dataclass
class DataConfig:
    """The whole data pipeline: sources, mixture, tokenization, packing, batching.

    batch_size: GLOBAL rows per step; each of ``process_count`` hosts yields
      ``batch_size // process_count`` rows.
    epochs: passes over the data (``None``: repeat forever). With ``mixture: weighted`` every
      source repeats ``epochs`` times and the mixture ends when the first one runs out.
    mixture: ``concat`` concatenates all sources and shuffles them together (proportional to
      size, as the Latxa Instruct study did); ``weighted`` samples sources by ``weight``.
    overlong: what to do with conversations longer than ``seq_len + 1`` tokens (corpus
      documents are always split into chunks).
    max_bad_fraction: skipped-record fraction per source above which the pipeline fails.
    tokenizer: tokenizer path (HF folder, tiktoken ``tokenizer.model``) or ``demo``.
    chat_template: ``auto`` (Llama 3.1's for a tokenizer with its special tokens, else the
      tokenizer's own Jinja template), ``llama31`` (official 3.1 format, always a system block
      with dates), ``llama3`` (Meta's reference format, no system block unless given) or a
      ``.jinja`` file (see ``templates.py``).
    chat_date / system_prompt: "Today Date" of the 3.1 system block and the system message
      used when a conversation has none.
    packing_bins: rows packed together by first-fit (default: the per-host batch size).
    drop_remainder: drop a final partial batch (else pad it with all-padding rows, e.g. to
      evaluate on every record).
    worker_count: grain worker processes (0: in-process). read_threads: threads per process.
    shuffle_buffer: shuffle buffer of streaming hub sources.
    prepared: a folder of prepared token shards (``basque-jax prepare``, see ``prepared.py``):
      training reads them instead of the raw sources, with every host packing the same global
      batches (a global data position, exact epochs); ``mixture`` must be ``concat``. A
      ``gs://`` folder can be prepared into, and is read through a mount (gcsfuse).
    shard_records: source records per prepared shard (the unit of parallel, resumable work).
    """

    sources: list[SourceConfig] = field(default_factory=list)
    seq_len: int = 2048
    batch_size: int = 8
    seed: int = 0
    epochs: int | None = 1
    mixture: Literal["concat", "weighted"] = "concat"
    overlong: Literal["truncate", "drop"] = "truncate"
    max_bad_fraction: float = 0.01
    tokenizer: str | None = None
    chat_template: str = "auto"
    chat_date: str = "26 Jul 2024"
    system_prompt: str = ""
    packing_bins: int | None = None
    drop_remainder: bool = True
    worker_count: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 1
    shuffle_buffer: int = 10_000
    prepared: str | None = None
    shard_records: int = 100_000

    def __post_init__(self) -> None:
        check_chat_template_setting(self.chat_template)
        checks = [
            (self.seq_len >= 2, "seq_len must be >= 2"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.epochs is None or self.epochs >= 1, "epochs must be >= 1 or null"),
            (0.0 <= self.max_bad_fraction <= 1.0, "max_bad_fraction must be in [0, 1]"),
            (self.packing_bins is None or self.packing_bins >= 1, "packing_bins must be >= 1"),
            (self.worker_count >= 0, "worker_count must be >= 0"),
            (self.worker_buffer_size >= 1, "worker_buffer_size must be >= 1"),
            (self.read_threads >= 0, "read_threads must be >= 0"),
            (self.shuffle_buffer >= 0, "shuffle_buffer must be >= 0"),
            (0 <= self.seed < 2**32, "seed must be in [0, 2**32)"),
            (self.shard_records >= 1, "shard_records must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"data: {msg}")
        streaming = [s.name for s in self.sources if s.streaming]
        if streaming and self.mixture != "weighted" and not self.prepared:
            raise ConfigError(f"data.mixture: streaming sources {streaming} have no known size "
                              "to concatenate and shuffle; use mixture 'weighted', or prepare "
                              "the data once (data.prepared + basque-jax prepare)")
        if self.prepared and self.mixture != "concat":
            raise ConfigError("data.mixture: prepared data is mixed as the study did (concat: "
                              "every source shuffled together); weighted mixing needs the raw "
                              "sources (data.prepared: null)")
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"data.sources: duplicate source names {dupes}; set `name`")
        if self.mixture == "concat":
            weighted = [s.name for s in self.sources if s.weight != 1.0]
            if weighted:
                raise ConfigError(
                    f"data.sources: weight only applies to mixture 'weighted' (set on {weighted})"
                )

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str = "data") -> DataConfig:
        """Builds a validated config from plain values; errors name the key."""
        return build(cls, d, where)

    def to_dict(self) -> dict[str, Any]:
        """Plain-value form (inverse of ``from_dict``)."""
        return dataclasses.asdict(self)


def _first(path: str | list[str] | None) -> str:
    if isinstance(path, list):
        return path[0] if path else ""
    return path or ""
