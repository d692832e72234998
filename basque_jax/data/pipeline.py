"""The data pipeline end to end: ``make_pipeline(cfg, tokenizer) -> iterator of batches``.

    sources -> mix/shuffle/epochs/host shard -> decode + template + segment (RecordProcessor)
    -> count & skip bad records -> pack to seq_len -> per-host batches -> worker processes

or, with ``data.prepared`` (token shards written once by ``basque-jax prepare``), the global
batches of ``global_batches.py``: one packing plan on every host, each feeding its own rows.

The iterator is a grain ``DatasetIterator``: ``get_state()``/``set_state()`` (JSON-able dicts;
the training checkpoint saves them with grain's orbax handler) resume exactly;
``pipeline_stats(it)`` reports skipped and truncated records. Batches follow the contract
in ``batch.py``.

With ``worker_count > 0`` grain spawns worker processes (each reads every ``worker_count``-th
record of the host's shard, tokenizes and packs): scripts that build a pipeline need an
``if __name__ == "__main__":`` guard. The output depends on ``worker_count`` (deterministically),
so resume with the same value.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Iterable
from typing import Any

import grain

from basque_jax.data.batch import pad_batch
from basque_jax.data.config import DataConfig
from basque_jax.data.examples import RecordProcessor
from basque_jax.data.hub import HubStreamIterDataset
from basque_jax.data.mixture import (
    mix_random_access,
    mix_streaming,
    open_sources,
    streaming_sources,
)
from basque_jax.data.packing import pack
from basque_jax.data.sources import RawRecord
from basque_jax.data.stats import CountingIterDataset, DataError, collect_stats, format_stats
from basque_jax.data.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

PROBE_RECORDS = 1000  # records read at start-up looking for a source's first valid one


def mark_absl_flags_parsed(*_: Any) -> None:
    """grain reads absl flags; worker processes (and non-absl mains) need them parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def probe_source(name: str, records: Iterable[RawRecord], processor: RecordProcessor) -> None:
    """Raises ``DataError`` unless one of the first ``PROBE_RECORDS`` records yields training
    segments (so a source that is all bad, or all over-long, fails at start-up)."""
    errors: list[str] = []
    for rec in itertools.islice(records, PROBE_RECORDS):
        out = processor(rec)
        if out.segments:
            return
        errors.append(f"{out.where}: {out.error or out.note}")
    raise DataError(
        f"source {name}: no valid record among the first {len(errors)} records; first errors:\n  "
        + "\n  ".join(errors[:5])
    )


def make_dataset(
    cfg: DataConfig,
    tokenizer: Tokenizer | None = None,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """The per-host batch dataset (see the module docstring)."""
    if not cfg.sources:
        raise DataError("data.sources is empty")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if cfg.batch_size % process_count:
        raise ValueError(
            f"data.batch_size {cfg.batch_size} is not divisible by {process_count} processes"
        )
    if tokenizer is None:
        if not cfg.tokenizer:
            raise ValueError("no tokenizer given and data.tokenizer is not set")
        tokenizer = load_tokenizer(cfg.tokenizer)
    if cfg.prepared:
        return prepared_dataset(cfg, tokenizer, process_index, process_count)
    per_host = cfg.batch_size // process_count
    processor = RecordProcessor(cfg.sources, tokenizer, cfg)
    read_options = grain.ReadOptions(
        num_threads=cfg.read_threads, prefetch_buffer_size=max(64, 8 * per_host)
    )

    random_access = open_sources(cfg)
    for name, ds in random_access.items():
        probe_source(name, (ds[i] for i in range(min(len(ds), PROBE_RECORDS))), processor)
    streams = streaming_sources(cfg)
    for s in streams:
        probe = HubStreamIterDataset(s, seed=0, shuffle_buffer=0, epochs=1)
        probe_source(s.name, iter(probe), processor)

    shard = {"process_index": process_index, "process_count": process_count}
    if streams:
        processed = mix_streaming(cfg, random_access, read_options, **shard).map(processor)
    else:
        ordered = [random_access[s.name] for s in cfg.sources]
        records = mix_random_access(ordered, cfg, **shard)
        processed = records.map(processor).to_iter_dataset(read_options)
    segments = CountingIterDataset(processed, max_bad_fraction=cfg.max_bad_fraction)
    rows = pack(segments, cfg.seq_len, num_bins=cfg.packing_bins or per_host, seed=cfg.seed)
    batches = rows.batch(per_host, drop_remainder=cfg.drop_remainder)
    if not cfg.drop_remainder:
        batches = batches.map(functools.partial(pad_batch, rows=per_host))
    if cfg.worker_count > 0:
        mark_absl_flags_parsed()
        if streams:
            log.warning("streaming sources run in-process; prefetching batches in a thread")
            return grain.experimental.ThreadPrefetchIterDataset(
                batches, prefetch_buffer_size=cfg.worker_buffer_size
            )
        options = grain.MultiprocessingOptions(
            num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size
        )
        batches = batches.mp_prefetch(options, worker_init_fn=mark_absl_flags_parsed)
    return batches


def prepared_dataset(cfg: DataConfig, tokenizer: Tokenizer, process_index: int,
                     process_count: int) -> grain.IterDataset:
    """This host's rows of the global batches of prepared data (``global_batches.py``),
    prefetched in a thread."""
    from basque_jax.data.global_batches import Planner, PreparedBatches
    from basque_jax.data.prepared import open_prepared

    sources = open_prepared(cfg, tokenizer)
    ds = PreparedBatches(Planner(sources, cfg), sources, process_index=process_index,
                         process_count=process_count, read_threads=max(cfg.read_threads, 4))
    return grain.experimental.ThreadPrefetchIterDataset(
        ds, prefetch_buffer_size=cfg.worker_buffer_size)


def make_pipeline(
    cfg: DataConfig,
    tokenizer: Tokenizer | None = None,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """An iterator of per-host batches with ``get_state``/``set_state`` (see module doc)."""
    ds = make_dataset(cfg, tokenizer, process_index=process_index, process_count=process_count)
    return iter(ds)


def pipeline_stats(iterator: grain.DatasetIterator) -> dict[str, Any]:
    """Per-source record counters (valid, bad by reason, truncated, ...) so far."""
    return collect_stats(iterator.get_state())


def pipeline_summary(iterator: grain.DatasetIterator) -> str:
    """``pipeline_stats`` as readable text naming the first bad records."""
    return format_stats(pipeline_stats(iterator))
