"""Mixtures: combine sources, shuffle (seeded), repeat for epochs, shard across hosts.

Random-access sources (files, map-style hub datasets, ArrayRecord, TFDS):

- ``concat``: all records concatenated and globally shuffled together -- each source appears
  in proportion to its size, as in the Latxa Instruct study; every epoch reshuffled;
- ``weighted``: every source shuffled and repeated ``epochs`` times on its own, then sampled by
  weight; the mixture ends when the first source runs out.

The global order is identical on every host (same seed), and host ``i`` of ``n`` takes records
``i, i + n, i + 2n, ...`` of it: disjoint shards that together cover every record. Worker
processes slice a host's shard the same way.

If any source is a streaming hub dataset, mixing happens on iterators (``weighted`` only):
streams are split by host with ``datasets.distributed.split_dataset_by_node`` and shuffled
with a buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain

from basque_jax.data.config import DataConfig, SourceConfig
from basque_jax.data.hub import HubStreamIterDataset
from basque_jax.data.sources import open_random_access
from basque_jax.data.stats import DataError


def source_seed(seed: int, index: int) -> int:
    """A distinct, deterministic shuffle seed per source."""
    return (seed + 1_000_003 * index) % 2**32


def mix_random_access(
    sources: Sequence[grain.MapDataset],
    cfg: DataConfig,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """The record order of this host for random-access sources (see module docstring)."""
    if cfg.mixture == "concat":
        ds = sources[0] if len(sources) == 1 else grain.MapDataset.concatenate(list(sources))
        ds = ds.shuffle(seed=cfg.seed).repeat(cfg.epochs)
    else:
        parts = [
            s.shuffle(seed=source_seed(cfg.seed, i)).repeat(cfg.epochs)
            for i, s in enumerate(sources)
        ]
        weights = [s.weight for s in cfg.sources]
        ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    return ds[process_index::process_count]


def mix_streaming(
    cfg: DataConfig,
    random_access: dict[str, grain.MapDataset],
    read_options: grain.ReadOptions,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """The record stream of this host when some sources are streaming hub datasets."""
    if cfg.mixture != "weighted":
        streaming = [s.name for s in cfg.sources if s.streaming]
        raise DataError(
            f"streaming sources {streaming} have no known size: use mixture 'weighted' "
            "(or streaming: false)"
        )
    parts = []
    for i, s in enumerate(cfg.sources):
        if s.streaming:
            parts.append(
                HubStreamIterDataset(
                    s,
                    seed=source_seed(cfg.seed, i),
                    shuffle_buffer=cfg.shuffle_buffer,
                    epochs=cfg.epochs,
                    process_index=process_index,
                    process_count=process_count,
                )
            )
        else:
            ds = random_access[s.name].shuffle(seed=source_seed(cfg.seed, i)).repeat(cfg.epochs)
            parts.append(ds[process_index::process_count].to_iter_dataset(read_options))
    if len(parts) == 1:
        return parts[0]
    return grain.IterDataset.mix(parts, [s.weight for s in cfg.sources])


def open_sources(cfg: DataConfig) -> dict[str, grain.MapDataset]:
    """Random-access ``MapDataset``s of the non-streaming sources, by name."""
    return {s.name: open_random_access(s) for s in cfg.sources if not s.streaming}


def streaming_sources(cfg: DataConfig) -> list[SourceConfig]:
    """The streaming hub sources of ``cfg``."""
    return [s for s in cfg.sources if s.streaming]
