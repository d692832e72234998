"""What ``generate`` and ``translate`` share: the model and mesh from config, per-index seeds,
the sampler, the resumable writer and the final filter pass."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from basque_jax.config import MeshSection
from basque_jax.data.config import ConfigError
from basque_jax.data.tokenizer import Tokenizer, load_tokenizer
from basque_jax.model.llama import Llama
from basque_jax.sample.config import ModelSource, SamplerSection
from basque_jax.sample.filters import FilterConfig, filter_files
from basque_jax.sample.sampler import Sampler
from basque_jax.sample.shards import shard_paths
from basque_jax.sharding import (
    MeshConfig,
    make_mesh,
    rules_with_overrides,
    shard_model,
    use_sharding,
    validate_mesh,
)


@dataclass
class LoadedModel:
    """A placed model, its tokenizer, mesh and rules, and the name recorded in metadata."""

    model: Llama
    tokenizer: Tokenizer
    mesh: Mesh
    rules: dict[str, Any]
    name: str


def derive_seed(seed: int, index: int, phase: int = 0) -> int:
    """A 32-bit seed for work item ``index`` (and pipeline ``phase``), stable across runs."""
    digest = hashlib.blake2b(f"{seed}:{index}:{phase}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def make_run_mesh(section: MeshSection, devices=None) -> tuple[Mesh, dict[str, Any]]:
    mesh = make_mesh(MeshConfig(dcn=section.dcn, data=section.data, fsdp=section.fsdp,
                                tensor=section.tensor), devices)
    return mesh, rules_with_overrides(section.rules)


def load_model(src: ModelSource, mesh_section: MeshSection, devices=None) -> LoadedModel:
    """The model of ``src`` placed on the mesh of ``mesh_section``, and its tokenizer.

    The mesh spans this process's devices only (default): with several processes each one
    samples its own share of the work independently, so the model must fit one host.
    """
    if jax.process_count() > 1 and src.train_dir:
        raise ConfigError("model.train_dir: with several processes, export the run first "
                          "(basque-jax export RUN OUT) and sample from model.init_from=OUT")
    mesh, rules = make_run_mesh(mesh_section, jax.local_devices() if devices is None
                                else devices)
    tokenizer_path = src.tokenizer
    with use_sharding(mesh, rules):
        if src.train_dir:
            model, run_tokenizer = _restore_run(src, mesh_section)
            tokenizer_path = tokenizer_path or run_tokenizer
        elif src.init_from:
            from basque_jax.model.hf import load_pretrained

            model = load_pretrained(src.init_from, dtype=src.param_dtype,
                                    compute_dtype=src.dtype, mesh=mesh, rules=rules)
            tokenizer_path = tokenizer_path or src.init_from
        else:
            from basque_jax.model.config import LlamaConfig

            model = Llama(LlamaConfig.preset(src.preset), param_dtype=jnp.dtype(src.param_dtype),
                          dtype=jnp.dtype(src.dtype), rngs=nnx.Rngs(src.seed))
            shard_model(model, mesh, rules)
        if src.merge_lora:
            from basque_jax.model.lora import has_lora, merge_lora

            if has_lora(model):
                merge_lora(model)
    batch_rows = math.prod(mesh.shape[a] for a in ("dcn", "data", "fsdp") if a in mesh.shape)
    validate_mesh(mesh, model.config, batch_rows, rules)
    if not tokenizer_path:
        raise ValueError("model.tokenizer: no tokenizer given and none found with the model")
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                         f"vocab_size is {model.config.vocab_size}")
    return LoadedModel(model, tokenizer, mesh, rules, src.display_name)


def _restore_run(src: ModelSource, mesh_section: MeshSection) -> tuple[Llama, str | None]:
    """A training run's checkpointed model (trainable + frozen weights), on our mesh."""
    from basque_jax.config import RunConfig
    from basque_jax.train.checkpoint import Checkpointer
    from basque_jax.train.loop import restore_model

    folder = Path(src.train_dir)
    ckpt = Checkpointer(folder / "checkpoints", async_save=False)
    try:
        meta = ckpt.read_meta(src.step)
    finally:
        ckpt.close()
    cfg = RunConfig.from_dict(meta["config"])
    cfg.mesh = mesh_section
    cfg.train.output_dir = str(folder)
    return restore_model(cfg, src.step), cfg.data.tokenizer


def make_sampler(loaded: LoadedModel, section: SamplerSection) -> Sampler:
    """A :class:`Sampler` for ``loaded`` on its mesh."""
    return Sampler(loaded.model, batch_size=section.batch_size, max_len=section.max_len,
                   chunk_steps=section.chunk_steps, mesh=loaded.mesh, rules=loaded.rules,
                   unstack=section.unstack)


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
