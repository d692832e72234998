"""Hugging Face hub and TFDS sources: map-style (random access) and streaming.

A map-style hub dataset or a TFDS data source becomes :class:`IndexedRecords` (random access,
see ``sources.open_random_access``); a streaming hub dataset becomes
:class:`HubStreamIterDataset`, a checkpointable ``grain.IterDataset`` sharded per host.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import grain

from basque_jax.data.config import SourceConfig
from basque_jax.data.sources import RawRecord
from basque_jax.data.stats import DataError
from basque_jax.errors import InputNotFound, MissingDependency


class IndexedRecords:
    """Random access over a sequence of dicts (a hub ``Dataset`` or a TFDS data source)."""

    def __init__(self, data: Any, source: str):
        self.source = source
        self._data = data

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, i: int) -> RawRecord:
        return RawRecord(self.source, f"{self.source}[{i}]", dict(self._data[i]))


def import_datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise MissingDependency(
            "hub sources need the `datasets` package: pip install 'basque-jax[hub]'"
        ) from e
    return datasets


def load_hub(cfg: SourceConfig, streaming: bool) -> Any:
    datasets = import_datasets()
    try:
        return datasets.load_dataset(
            cfg.hf_dataset,
            cfg.subset,
            split=cfg.split,
            data_files=cfg.data_files,
            data_dir=cfg.data_dir,
            streaming=streaming,
        )
    except FileNotFoundError as e:
        raise InputNotFound(f"source {cfg.name}: {e}") from e


def tfds_source(cfg: SourceConfig) -> IndexedRecords:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise MissingDependency(
            f"source {cfg.name}: tfds_name needs `pip install tensorflow-datasets`"
        ) from e
    data = tfds.data_source(cfg.tfds_name, split=cfg.split, data_dir=cfg.data_dir)
    return IndexedRecords(data, cfg.name)


class HubStreamIterDataset(grain.IterDataset):
    """A streaming hub dataset, sharded per host, shuffled per epoch, checkpointable.

    State is ``{"epoch", "consumed"}``; restoring replays the (deterministic) stream and skips
    ``consumed`` records, so a resumed run sees exactly the same records.
    """

    def __init__(
        self,
        cfg: SourceConfig,
        *,
        seed: int,
        shuffle_buffer: int,
        epochs: int | None,
        process_index: int = 0,
        process_count: int = 1,
    ):
        super().__init__()
        self._cfg = cfg
        self._seed = seed
        self._shuffle_buffer = shuffle_buffer
        self._epochs = epochs
        self._shard = (process_index, process_count)

    def build(self) -> Any:
        """The underlying ``datasets.IterableDataset`` for this host."""
        ds = load_hub(self._cfg, streaming=True)
        if self._cfg.max_records is not None:
            ds = ds.take(self._cfg.max_records)
        if self._shard[1] > 1:
            from datasets.distributed import split_dataset_by_node

            ds = split_dataset_by_node(ds, rank=self._shard[0], world_size=self._shard[1])
        if self._shuffle_buffer > 0:
            ds = ds.shuffle(seed=self._seed, buffer_size=self._shuffle_buffer)
        return ds

    def __iter__(self) -> _HubStreamIterator:
        return _HubStreamIterator(self)

    def __str__(self) -> str:
        return f"HubStreamIterDataset({self._cfg.name})"


class _HubStreamIterator(grain.DatasetIterator):
    def __init__(self, parent: HubStreamIterDataset):
        super().__init__()
        self._spec = parent
        self._ds = parent.build()
        self._epoch = 0
        self._consumed = 0
        self._it: Iterator | None = None

    def _start(self) -> None:
        self._ds.set_epoch(self._epoch)
        self._it = itertools.islice(iter(self._ds), self._consumed, None)

    def __next__(self) -> RawRecord:
        name = self._spec._cfg.name
        while True:
            epochs = self._spec._epochs
            if epochs is not None and self._epoch >= epochs:
                raise StopIteration
            if self._it is None:
                self._start()
            try:
                row = next(self._it)
            except StopIteration:
                if self._consumed == 0:
                    raise DataError(f"source {name}: no records (empty stream)") from None
                self._epoch, self._consumed, self._it = self._epoch + 1, 0, None
                continue
            self._consumed += 1
            where = f"{name}[epoch {self._epoch}, #{self._consumed}]"
            return RawRecord(name, where, dict(row))

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "consumed": self._consumed}

    def set_state(self, state: dict[str, Any]) -> None:
        self._epoch, self._consumed, self._it = state["epoch"], state["consumed"], None
