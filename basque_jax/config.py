"""The run configuration of ``basque-jax train`` / ``plan`` / ``prepare``: one typed section
per stage, each the object that stage's code takes.

``load_config("configs/demo.yaml", ["optim.lr=3e-4", "lora.rank=8"])`` reads the YAML (with
``base:``, ``vars:``, overrides and ``@embedded/`` paths, see :mod:`basque_jax.yaml_config`)
and validates everything, raising :class:`ConfigError` naming the file and key for unknown
keys, wrong types and impossible values. Sections defined next to their code:
``data`` (:class:`~basque_jax.data.config.DataConfig`), ``lora``
(:class:`~basque_jax.model.lora.LoraConfig`), ``mesh``
(:class:`~basque_jax.sharding.MeshConfig`), ``optim``
(:class:`~basque_jax.train.optim.OptimConfig`), ``sample``
(:class:`~basque_jax.sample.attached.TrainingSamplesConfig`), ``eval_tasks``
(:class:`~basque_jax.eval.live.EvalTasksConfig`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from basque_jax.data.config import DataConfig
from basque_jax.errors import ConfigError
from basque_jax.eval.live import EvalTasksConfig
from basque_jax.model.config import DTYPES
from basque_jax.model.llama import REMAT_POLICIES
from basque_jax.model.lora import LoraConfig
from basque_jax.sample.attached import TrainingSamplesConfig
from basque_jax.sharding import MeshConfig
from basque_jax.topology import parse_topology
from basque_jax.train.optim import OptimConfig
from basque_jax.yaml_config import build, load_yaml_config

__all__ = ["ConfigError", "DTYPES", "ModelConfig", "PlanConfig", "RunConfig", "TrainConfig",
           "load_config"]


@dataclass
class ModelConfig:
    """Which weights, and how to hold and run them (the ``model:`` section of every config).

    Exactly one source: ``preset`` (random init, for tests), ``init_from`` (a Hugging Face
    folder) or ``train_dir`` (a ``basque-jax train`` output folder: its latest checkpoint, or
    ``step``; for sampling and evaluation). ``tokenizer`` defaults to the HF folder's or the
    run's ``data.tokenizer``. ``seed``: the random init of a preset (a training run uses
    ``train.seed``). ``merge_lora``: fold a run's adapters into the weights before sampling.
    ``scan_unroll``: layers per iteration of the layer loop (true: no loop; faster for a few
    layers on CPU, slow to compile for deep models). ``name``: how records and results name
    the model.
    """

    preset: str | None = None
    init_from: str | None = None
    train_dir: str | None = None
    step: int | None = None
    tokenizer: str | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    attention: str = "auto"
    remat: str = "none"
    scan_unroll: int | bool = 1
    seed: int | None = None
    merge_lora: bool = False
    name: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("preset", "init_from", "train_dir") if getattr(self, k)]
        if len(given) != 1:
            raise ConfigError(f"model: set exactly one of preset, init_from, train_dir "
                              f"(got {given or 'none'})")
        if self.step is not None and not self.train_dir:
            raise ConfigError("model.step: applies to model.train_dir only")
        for key in ("param_dtype", "dtype"):
            if getattr(self, key) not in DTYPES:
                raise ConfigError(f"model.{key}: expected one of {DTYPES}, got "
                                  f"{getattr(self, key)!r}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat: expected one of {list(REMAT_POLICIES)}, got "
                              f"{self.remat!r}")
        if not isinstance(self.scan_unroll, bool) and (not isinstance(self.scan_unroll, int)
                                                       or self.scan_unroll < 1):
            raise ConfigError(f"model.scan_unroll: expected true or an integer >= 1, got "
                              f"{self.scan_unroll!r}")

    @property
    def display_name(self) -> str:
        return self.name or str(self.init_from or self.train_dir or f"preset:{self.preset}")


@dataclass
class TrainConfig:
    """The ``train:`` section: steps, the step's options, logging, evaluation, checkpoints.

    micro_batches / neftune_alpha / z_loss / loss_chunk / seed are what the jitted step uses
    (:func:`basque_jax.train.step.make_step_fn`). ``steps: null`` with prepared data: exactly the
    batches of ``data.epochs`` passes (counted from the prepared index). With ``epoch_tokens``
    (an estimate of the tokens in one pass over raw ``data.sources``) the steps are derived
    from ``data.epochs``. ``accept_config_changes``: resume even though the model, LoRA, data or
    schedule differ from the checkpoint's (they are listed and refused otherwise).
    """

    output_dir: str = "runs/default"
    steps: int | None = 100
    micro_batches: int = 1
    seed: int = 0
    neftune_alpha: float = 0.0
    z_loss: float = 0.0
    loss_chunk: int = 0
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 4
    save_every: int = 0
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    progress_bar: bool = True
    tensorboard: bool = True
    epoch_tokens: int | None = None
    accept_config_changes: bool = False

    def __post_init__(self) -> None:
        if self.epoch_tokens is not None and self.epoch_tokens < 1:
            raise ConfigError(f"train.epoch_tokens: must be >= 1, got {self.epoch_tokens}")
        for key in ("steps", "micro_batches", "log_every", "eval_batches", "keep_checkpoints"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("eval_every", "save_every", "neftune_alpha", "z_loss", "loss_chunk"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: must be >= 0, got {getattr(self, key)}")


@dataclass
class PlanConfig:
    """Where the run is meant to go, for ``basque-jax plan`` (AOT compile, memory, cost).

    topology: a Cloud TPU accelerator type (``v5e-8``, ``v6e-8``, ``v5p-32``) or
      ``generation:shape`` (``v5e:2x2``). architecture: the model preset to plan with when
      ``model.init_from`` is not readable here (its config.json is used when it is).
    mfu: model FLOPs utilisation assumed for time and cost estimates. decode_batch: rows of the
      planned decode step (default: one row per batch shard of the mesh).
    """

    topology: str | None = None
    architecture: str | None = None
    mfu: float = 0.4
    decode_batch: int | None = None

    def __post_init__(self) -> None:
        if self.topology is not None:
            try:
                parse_topology(self.topology)
            except ValueError as e:
                raise ConfigError(f"plan.topology: {e}") from None
        if self.architecture is not None:
            from basque_jax.model.config import PRESETS

            if self.architecture not in PRESETS:
                raise ConfigError(f"plan.architecture: unknown preset {self.architecture!r}; "
                                  f"known: {', '.join(sorted(PRESETS))}")
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"plan.mfu: must be in (0, 1], got {self.mfu}")
        if self.decode_batch is not None and self.decode_batch < 1:
            raise ConfigError(f"plan.decode_batch: must be >= 1, got {self.decode_batch}")


@dataclass
class RunConfig:
    """Everything one ``basque-jax train`` run needs.

    With ``train.epoch_tokens`` the number of steps is
    ``ceil(data.epochs * epoch_tokens / (data.batch_size * data.seq_len))``.
    """

    model: ModelConfig
    data: DataConfig
    lora: LoraConfig = field(default_factory=LoraConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_data: DataConfig | None = None
    plan: PlanConfig = field(default_factory=PlanConfig)
    sample: TrainingSamplesConfig = field(default_factory=TrainingSamplesConfig)
    eval_tasks: EvalTasksConfig = field(default_factory=EvalTasksConfig)

    def __post_init__(self) -> None:
        m = self.model
        for key, why in (("train_dir", "starts from model.preset or model.init_from (export "
                                       "an earlier run first: basque-jax export)"),
                         ("tokenizer", "uses data.tokenizer"),
                         ("merge_lora", "trains its adapters unmerged")):
            if getattr(m, key):
                raise ConfigError(f"model.{key}: a training run {why}")
        if self.train.steps is None and self.train.epoch_tokens is None and not (
                self.data.prepared and self.data.epochs):
            raise ConfigError("train.steps: null (the exact length of data.epochs passes) needs "
                              "data.prepared and data.epochs; else give a number of steps")
        if self.train.epoch_tokens is not None:
            if self.data.epochs is None:
                raise ConfigError("train.epoch_tokens: needs data.epochs (a number of passes)")
            self.train.steps = math.ceil(self.data.epochs * self.train.epoch_tokens
                                         / (self.data.batch_size * self.data.seq_len))
        if self.data.batch_size % self.train.micro_batches:
            raise ConfigError(f"train.micro_batches: {self.train.micro_batches} does not divide "
                              f"data.batch_size {self.data.batch_size}")
        if self.train.eval_every and self.eval_data is None:
            raise ConfigError("train.eval_every: set eval_data (held-out sources) to evaluate")

    @property
    def init_seed(self) -> int:
        """The seed of the random parts of the initial model (preset weights)."""
        return self.train.seed if self.model.seed is None else self.model.seed

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return build(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _steps_once(d: dict[str, Any]) -> None:
    train = d.get("train") or {}
    if isinstance(train, dict) and train.get("epoch_tokens") is not None and "steps" in train:
        raise ConfigError("train.steps: set either train.steps or train.epoch_tokens (which "
                          "derives the steps); to run a fixed number of steps, also set "
                          "train.epoch_tokens=null")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override and validate a run config (see the module docstring)."""
    return load_yaml_config(RunConfig, path, overrides, check=_steps_once)
