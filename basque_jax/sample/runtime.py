"""What ``generate`` and ``translate`` share: the model from config, per-index seeds, the
sampler and the final filter pass."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax

from basque_jax.config import ModelConfig
from basque_jax.data.tokenizer import Tokenizer
from basque_jax.errors import ConfigError
from basque_jax.runs import LoadedModel, load_model
from basque_jax.sample.filters import FilterConfig, filter_files
from basque_jax.sample.sampler import Sampler, SamplerConfig
from basque_jax.sample.shards import shard_paths
from basque_jax.sharding import MeshConfig


def derive_seed(seed: int, index: int, phase: int = 0) -> int:
    """A 32-bit seed for work item ``index`` (and pipeline ``phase``), stable across runs."""
    digest = hashlib.blake2b(f"{seed}:{index}:{phase}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def load_sampling_model(model: ModelConfig, mesh: MeshConfig) -> tuple[LoadedModel, Tokenizer]:
    """The model of a sample config on this process's devices, and its tokenizer.

    With several processes each one samples its own share of the work independently, so the
    model must fit one host (a training run must then be exported first).
    """
    if jax.process_count() > 1 and model.train_dir:
        raise ConfigError("model.train_dir: with several processes, export the run first "
                          "(basque-jax export RUN OUT) and sample from model.init_from=OUT")
    loaded = load_model(model, mesh=mesh, devices=jax.local_devices())
    return loaded, loaded.load_tokenizer()


def make_sampler(loaded: LoadedModel, config: SamplerConfig) -> Sampler:
    """A :class:`Sampler` for ``loaded`` on its mesh."""
    return Sampler(loaded.model, config, mesh=loaded.mesh, rules=loaded.rules)


def finish(out_dir: str | Path, filters: FilterConfig) -> dict[str, Any] | None:
    """After every process is done: process 0 filters all shards into ``filtered.jsonl`` and
    writes ``filter_report.json``. Returns the report (None when filters are off)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("basque_jax_sample_done")
    if not filters.enabled or jax.process_index() != 0 or not shard_paths(out_dir):
        return None
    out = Path(out_dir)
    report = filter_files([out], out / "filtered.jsonl", filters, out / "filter_report.json")
    print(f"[filter] kept {report['kept']} of {report['input']}: "
          f"{json.dumps(report['removed'])}")
    return report
