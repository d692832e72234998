"""``basque-jax prepare``: a run config's data tokenized once into prepared shards.

Every source of ``data`` (and of ``eval_data`` when it sets ``prepared`` too) goes through the
same readers, record formats, chat template, loss masks and bad-record checks as training
(:class:`~basque_jax.data.examples.RecordProcessor`), and is written in the layout of
:mod:`basque_jax.data.prepared`. Sources are split into shards of ``data.shard_records``
records; shards are the unit of work: spread over worker processes, over the hosts of a pod
(``--host-id`` / ``--num-hosts``, or the TPU worker environment), and over restarts -- a
finished shard (its ``.json`` written last) is never redone, an unfinished one is rewritten
from scratch, so a killed and restarted prepare gives byte-identical shards. Hub datasets are
read map-style: prepare downloads them into the Hugging Face cache (``HF_HOME``) once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from basque_jax.data.config import DataConfig, SourceConfig
from basque_jax.data.examples import RecordProcessor
from basque_jax.data.formats import BadRecord
from basque_jax.data.prepared import (
    FORMAT,
    MANIFEST,
    encode_example,
    fingerprints,
    shard_name,
    source_dir,
    source_record,
)
from basque_jax.data.stats import FIRST_BAD, DataError
from basque_jax.data.tokenizer import load_tokenizer
from basque_jax.errors import ConfigError


@dataclass(frozen=True)
class ShardTask:
    """One shard of one source: records ``[start, stop)``."""

    data: DataConfig
    source: SourceConfig
    index: int
    count: int
    start: int
    stop: int

    @property
    def folder(self) -> Path:
        return source_dir(self.data.prepared, self.source)

    @property
    def name(self) -> str:
        return shard_name(self.index, self.count)


def _is_remote(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def _exists(path: str) -> bool:
    from etils import epath

    return epath.Path(path).exists()


_OPENED: dict[str, tuple[Any, RecordProcessor]] = {}


def _open(data: DataConfig, source: SourceConfig) -> tuple[Any, RecordProcessor]:
    """The source's records and the processor of its examples (once per worker process)."""
    from basque_jax.data.sources import open_random_access

    key = json.dumps([data.to_dict(), source_record(source)], sort_keys=True, default=str)
    if key not in _OPENED:
        tokenizer = load_tokenizer(data.tokenizer)
        _OPENED[key] = open_random_access(source), RecordProcessor([source], tokenizer, data)
    return _OPENED[key]


def prepare_shard(task: ShardTask) -> dict[str, Any]:
    """Tokenize one shard and write it (array_record + index + stats, the stats last)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    records, processor = _open(task.data, task.source)
    stats: dict[str, Any] = {"records": 0, "examples": 0, "tokens": 0, "loss_tokens": 0,
                             "bad": 0, "reasons": {}, "first_bad": []}
    index = []
    with tempfile.TemporaryDirectory(prefix=f".{task.name}.", dir=_staging(task)) as tmp:
        local = Path(tmp) / f"{task.name}.array_record"
        writer = ArrayRecordWriter(str(local), "group_size:1")
        for i in range(task.start, task.stop):
            rec = records[i]
            stats["records"] += 1
            try:
                ids, mask, _ = processor.tokenize(rec)
                if len(ids) < 2 or not any(mask[1:]):
                    raise BadRecord("no trained tokens")
            except BadRecord as e:
                stats["bad"] += 1
                stats["reasons"][e.reason] = stats["reasons"].get(e.reason, 0) + 1
                if len(stats["first_bad"]) < FIRST_BAD:
                    stats["first_bad"].append(f"{rec.where}: {e.reason}")
                continue
            writer.write(encode_example(ids, mask))
            first = next(k for k in range(1, len(mask)) if mask[k])
            index.append((len(ids), first))
            stats["examples"] += 1
            stats["tokens"] += len(ids)
            stats["loss_tokens"] += int(sum(mask[1:]))
        writer.close()
        np.save(Path(tmp) / f"{task.name}.index.npy", np.asarray(index, np.int32).reshape(-1, 2))
        (Path(tmp) / f"{task.name}.json").write_text(json.dumps(stats, indent=1) + "\n")
        for suffix in (".array_record", ".index.npy", ".json"):  # the stats file last
            _publish(Path(tmp) / f"{task.name}{suffix}", task.folder / f"{task.name}{suffix}")
    return stats


def _staging(task: ShardTask) -> str | None:
    """Where a shard is written before it is moved into place (remote output: a local dir)."""
    if _is_remote(task.data.prepared):
        return None
    task.folder.mkdir(parents=True, exist_ok=True)
    return str(task.folder)


def _publish(src: Path, dst: Path) -> None:
    if _is_remote(os.fspath(dst)):
        from etils import epath

        epath.Path(os.fspath(dst)).parent.mkdir(parents=True, exist_ok=True)
        epath.Path(src).copy(epath.Path(os.fspath(dst)), overwrite=True)
    else:
        os.replace(src, dst)


def plan_shards(data: DataConfig) -> list[ShardTask]:
    """Every shard of every source of ``data`` (sources opened to count their records)."""
    from basque_jax.data.sources import open_random_access

    tasks = []
    for source in data.sources:
        if source.streaming:
            source = _map_style(source)
        n = len(open_random_access(source))
        count = max(1, -(-n // data.shard_records))
        tasks += [ShardTask(data, source, i, count, i * n // count, (i + 1) * n // count)
                  for i in range(count)]
    return tasks


def _map_style(source: SourceConfig) -> SourceConfig:
    import dataclasses

    return dataclasses.replace(source, streaming=False)


def _done(task: ShardTask) -> bool:
    return _exists(os.fspath(task.folder / f"{task.name}.json"))


def prepare(data: DataConfig, *, workers: int = 1, host_id: int = 0, num_hosts: int = 1,
            progress: bool = True) -> dict[str, Any]:
    """Prepare ``data`` (see module docstring): this host's unfinished shards, then the
    manifests of the sources whose shards are all done. Returns a summary."""
    if not data.prepared:
        raise ConfigError("data.prepared: set the folder to prepare the data into")
    if not data.tokenizer:
        raise ConfigError("data.tokenizer: prepare needs the run's tokenizer")
    tasks = plan_shards(data)
    todo = [t for k, t in enumerate(tasks) if k % num_hosts == host_id and not _done(t)]
    _remove_unfinished(todo)
    bar = _bar(progress, sum(t.stop - t.start for t in todo))
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for stats in pool.map(prepare_shard, todo):
                bar.update(stats["records"])
    else:
        for task in todo:
            bar.update(prepare_shard(task)["records"])
    bar.close()
    written = _write_manifests(data, tasks)
    waiting = sum(not _done(t) for t in tasks)
    summary = {"shards": len(tasks), "prepared_now": len(todo), "manifests": written,
               "waiting_for_other_hosts": waiting}
    if not waiting and data.epochs and host_id == 0 and not _is_remote(data.prepared):
        from basque_jax.data.global_batches import batches_per_run
        from basque_jax.data.prepared import open_prepared

        # the run's exact length, planned once here (cached beside the shards)
        summary["batches"] = batches_per_run(data, open_prepared(data, load_tokenizer(
            data.tokenizer)))
    return summary


def _bar(enabled: bool, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="prepare", unit="rec", disable=not enabled, dynamic_ncols=True)


def _by_source(tasks: list[ShardTask]) -> Iterator[tuple[SourceConfig, list[ShardTask]]]:
    names = list(dict.fromkeys(t.source.name for t in tasks))
    for name in names:
        group = [t for t in tasks if t.source.name == name]
        yield group[0].source, group


def _write_manifests(data: DataConfig, tasks: list[ShardTask]) -> list[str]:
    """The manifest of every source whose shards are all finished (same bytes from any host)."""
    from etils import epath

    tokenizer = load_tokenizer(data.tokenizer)
    prints = fingerprints(data, tokenizer)
    written = []
    for source, group in _by_source(tasks):
        if not all(_done(t) for t in group):
            continue
        parts = [json.loads(epath.Path(os.fspath(t.folder / f"{t.name}.json")).read_text())
                 for t in group]
        totals = {k: sum(p[k] for p in parts) for k in ("records", "examples", "tokens",
                                                         "loss_tokens", "bad")}
        reasons: dict[str, int] = {}
        for p in parts:
            for reason, n in p["reasons"].items():
                reasons[reason] = reasons.get(reason, 0) + n
        first_bad = [w for p in parts for w in p["first_bad"]][:FIRST_BAD]
        if totals["records"] and totals["bad"] / totals["records"] > data.max_bad_fraction:
            raise DataError(f"source {source.name}: {totals['bad']} of {totals['records']} "
                            f"records are bad (> data.max_bad_fraction {data.max_bad_fraction})"
                            f"; first: {'; '.join(first_bad)}")
        if not totals["examples"]:
            raise DataError(f"source {source.name}: no valid record; first: "
                            f"{'; '.join(first_bad)}")
        manifest = {"format": FORMAT, "source": source_record(source),
                    "shards": [t.name for t in group], **totals, "reasons": reasons,
                    "first_bad": first_bad, "fingerprints": prints,
                    "tokenizer": data.tokenizer, "chat_template": data.chat_template}
        path = epath.Path(os.fspath(group[0].folder / MANIFEST))
        path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        written.append(str(path))
    return written


def default_host() -> tuple[int, int]:
    """This host's place in a pod: TPU worker variables, or basque-jax's, else (0, 1)."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES")
    if hosts and os.environ.get("TPU_WORKER_ID"):
        return int(os.environ["TPU_WORKER_ID"]), len(hosts.split(","))
    if os.environ.get("BASQUE_JAX_NUM_PROCESSES"):
        return (int(os.environ.get("BASQUE_JAX_PROCESS_ID", "0")),
                int(os.environ["BASQUE_JAX_NUM_PROCESSES"]))
    return 0, 1


def _remove_unfinished(todo: list[ShardTask]) -> None:
    """Delete what killed writes of this host's unfinished shards left (staging folders)."""
    for task in todo:
        if not _is_remote(task.data.prepared) and task.folder.is_dir():
            for tmp in task.folder.glob(f".{task.name}.*"):
                shutil.rmtree(tmp, ignore_errors=True)
