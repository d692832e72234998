"""The model an evaluation runs: a YAML run config, a training run's checkpoint, or an HF folder.

* ``run.yaml`` (+ ``key=value`` overrides): the run's latest checkpoint under
  ``train.output_dir`` when one exists, else its initial model (backbone + fresh adapters);
  tokenizer ``data.tokenizer``; perplexity data ``eval_data``.
* a training output directory / ``DIR/checkpoints/STEP``: the checkpoint (``restore_model``)
  with the run's tokenizer, chat settings and ``eval_data``.
* a Hugging Face folder: loaded sharded over every device (``fsdp``); its own tokenizer files
  when it has them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from basque_jax.data.config import DataConfig

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class EvalModel:
    """A placed model and what evaluating it needs."""

    model: Any
    name: str
    mesh: Mesh
    rules: dict[str, Any]
    tokenizer: str | None = None
    eval_data: DataConfig | None = None
    step: int | None = None
    chat_template: str = "llama31"
    chat_date: str | None = None
    system_prompt: str = ""


def _mesh_of(model: nnx.Module) -> Mesh:
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            return var.value.sharding.mesh
    raise ValueError("model has no parameters")


def _from_run(cfg, step: int | None, name: str) -> EvalModel:
    from basque_jax.sharding import rules_with_overrides, use_sharding
    from basque_jax.train.checkpoint import Checkpointer
    from basque_jax.train.loop import build_model, restore_model, run_mesh

    ckpt_dir = Path(cfg.train.output_dir) / "checkpoints"
    has_ckpt = False
    if ckpt_dir.is_dir():
        ckpt = Checkpointer(ckpt_dir, async_save=False)
        has_ckpt = ckpt.latest_step() is not None
        ckpt.close()
    if has_ckpt:
        model = restore_model(cfg, step)
        mesh, rules = _mesh_of(model), rules_with_overrides(cfg.mesh.rules)
    else:
        if step is not None:
            raise FileNotFoundError(f"{ckpt_dir}: no checkpoint (asked for step {step})")
        mesh, rules = run_mesh(cfg)
        with use_sharding(mesh, rules):
            model = build_model(cfg, mesh, rules)
    d = cfg.data
    return EvalModel(model, name, mesh, rules, d.tokenizer, cfg.eval_data, step,
                     d.chat_template, d.chat_date, d.system_prompt)


def load_eval_model(spec: str | Path, *, step: int | None = None, dtype: str | None = None,
                    overrides: list[str] | tuple[str, ...] = ()) -> EvalModel:
    """Resolve ``spec`` (see the module docstring) into an :class:`EvalModel`."""
    p = Path(spec)
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        from basque_jax.config import load_config

        cfg = load_config(p, overrides)
        if dtype:
            cfg.model = dataclasses.replace(cfg.model, dtype=dtype)
        return _from_run(cfg, step, str(p))
    if overrides:
        raise ValueError("key=value overrides apply to a YAML run config only")
    from basque_jax.export.source import HFSource, resolve_source

    src = resolve_source(p, step)
    if isinstance(src, HFSource):
        from basque_jax.model.hf import load_pretrained
        from basque_jax.sharding import DEFAULT_RULES, MeshConfig, make_mesh

        mesh, rules = make_mesh(MeshConfig()), dict(DEFAULT_RULES)
        model = load_pretrained(src.folder, dtype=dtype, mesh=mesh, rules=rules)
        tok = str(src.folder) if any((src.folder / f).is_file() for f in _TOKENIZER_FILES) \
            else None
        return EvalModel(model, src.name, mesh, rules, tok)
    cfg = src.config
    cfg.train = dataclasses.replace(cfg.train, output_dir=str(src.run_dir))
    if dtype:
        cfg.model = dataclasses.replace(cfg.model, dtype=dtype)
    out = _from_run(cfg, src.step, src.name)
    out.step = src.step
    return out
