"""The run configuration: typed sections read from YAML plus ``key=value`` overrides.

``load_config("configs/demo.yaml", ["optim.lr=3e-4", "lora.rank=8"])`` validates everything and
raises :class:`ConfigError` naming the key (``train.steps: expected int, got str 'ten'``) for
unknown keys, wrong types and impossible values. A YAML file may name ``base: other.yaml``
(or a list of them, relative to itself) whose values it overrides, so configs compose without
copy-paste; a key written ``name+:`` extends the base's value instead of replacing it (lists are
concatenated, numbers added). Strings may use ``${var}`` for a key of the top-level ``vars:``
mapping (override with ``vars.var=...``) or ``${config_name}`` (the config file's stem).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from basque_jax.data.config import ConfigError, DataConfig, _build
from basque_jax.model.llama import REMAT_POLICIES
from basque_jax.sharding import LOGICAL_AXES
from basque_jax.topology import parse_topology

DTYPES = ("float32", "bfloat16", "float16")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` as a float (YAML 1.1 wants ``1.0e-5``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$|^[-+]?\d*\.\d+$|^[-+]?\.(?:inf|Inf)$"
               r"|^\.(?:nan|NaN)$"),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


@dataclass
class ModelSection:
    """preset (random init) or init_from (a Hugging Face folder)."""

    preset: str | None = None
    init_from: str | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    attention: str = "auto"
    remat: str = "none"
    # Layers per iteration of the layer loop; true: no loop (faster for a few layers on CPU,
    # slow to compile for deep models).
    scan_unroll: int | bool = 1

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.init_from is None):
            raise ConfigError("model: set exactly one of preset, init_from")
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


@dataclass
class LoraSection:
    """LoRA adapters; ``enabled: false`` means full fine-tuning.

    ``init_from``: a PEFT adapter folder to continue training from; its rank, alpha, targets
    and rsLoRA then replace ``rank``/``alpha``/``targets``/``use_rslora`` (``dropout`` stays).
    """

    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    use_rslora: bool = False
    base_dtype: str | None = None
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.init_from and not self.enabled:
            raise ConfigError("lora.init_from: set lora.enabled: true to train the adapter")
        if self.rank < 1:
            raise ConfigError(f"lora.rank: must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise ConfigError(f"lora.targets: unknown {unknown or 'empty list'}; "
                              f"choose from {LORA_TARGETS}")
        if self.base_dtype is not None and self.base_dtype not in DTYPES:
            raise ConfigError(f"lora.base_dtype: expected one of {DTYPES}")


@dataclass
class MeshSection:
    """Mesh axis sizes (-1: the rest) and overrides of the logical-axis table."""

    dcn: int = 1
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.rules) - set(LOGICAL_AXES))
        if unknown:
            raise ConfigError(f"mesh.rules.{unknown[0]}: unknown logical axis "
                              f"(known: {', '.join(LOGICAL_AXES)})")


@dataclass
class OptimSection:
    """AdamW with warmup + cosine decay to ``min_lr_ratio * lr`` and global-norm clipping."""

    lr: float = 1e-5
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.33
    clip_norm: float | None = 1.0

    def __post_init__(self) -> None:
        checks = [
            (self.lr > 0, "lr", "must be > 0"),
            (0 <= self.b1 < 1, "b1", "must be in [0, 1)"),
            (0 <= self.b2 < 1, "b2", "must be in [0, 1)"),
            (self.eps > 0, "eps", "must be > 0"),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]"),
            (self.clip_norm is None or self.clip_norm > 0, "clip_norm", "must be > 0 or null"),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ConfigError(f"optim.{key}: {msg}, got {getattr(self, key)}")


@dataclass
class TrainSection:
    """Steps, accumulation, regularisers, logging, evaluation and checkpointing."""

    output_dir: str = "runs/default"
    steps: int = 100
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

    def __post_init__(self) -> None:
        if self.epoch_tokens is not None and self.epoch_tokens < 1:
            raise ConfigError(f"train.epoch_tokens: must be >= 1, got {self.epoch_tokens}")
        for key in ("steps", "micro_batches", "log_every", "eval_batches", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("eval_every", "save_every", "neftune_alpha", "z_loss", "loss_chunk"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: must be >= 0, got {getattr(self, key)}")


@dataclass
class PlanSection:
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
class SampleSection:
    """Sampling from the weights being trained (``basque_jax.sample.attached``): every
    ``every`` steps (0: never) ``prompts`` are completed and logged to ``samples.jsonl``.

    chat: prompts are user messages through ``data.chat_template`` (else raw text after BOS).
    temperature 0 is greedy; ``seed`` fixes sampled completions across steps.
    """

    every: int = 0
    prompts: list[str] = field(default_factory=list)
    chat: bool = True
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"sample.every: must be >= 0, got {self.every}")
        if self.every and not self.prompts:
            raise ConfigError("sample.prompts: give at least one prompt to sample every "
                              f"{self.every} steps")
        if self.max_new_tokens < 1:
            raise ConfigError(f"sample.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError("sample: temperature must be >= 0, top_p in (0, 1], top_k >= 0")


@dataclass
class RunConfig:
    """Everything one ``basque-jax train`` run needs.

    With ``train.epoch_tokens`` (tokens in one pass over ``data.sources``) the number of steps
    is derived: ``ceil(data.epochs * epoch_tokens / (data.batch_size * data.seq_len))``.
    """

    model: ModelSection
    data: DataConfig
    lora: LoraSection = field(default_factory=LoraSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval_data: DataConfig | None = None
    plan: PlanSection = field(default_factory=PlanSection)
    sample: SampleSection = field(default_factory=SampleSection)

    def __post_init__(self) -> None:
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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return _build(cls, d, "config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _extend(key: str, old: Any, value: Any) -> Any:
    """``key+: value`` over a base value ``old``: lists concatenate, numbers add."""
    if old is None:
        return value
    if isinstance(old, list) and isinstance(value, list):
        return old + value
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (old, value))
    if numbers:
        return old + value
    raise ConfigError(f"{key}+: cannot extend {type(old).__name__} {old!r} with "
                      f"{type(value).__name__} {value!r} (lists or numbers only)")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(key, str) and key.endswith("+"):
            name = key[:-1]
            out[name] = _extend(name, out.get(name), _merge({}, value)
                                if isinstance(value, dict) else value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping with its ``base:`` chain resolved (cycles are an error)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: base cycle through {' -> '.join(map(str, _seen))}")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        d = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = d.pop("base", None)
    if base is None:
        return _merge({}, d)
    bases = [base] if isinstance(base, str) else list(base)
    merged: dict[str, Any] = {}
    for b in bases:
        merged = _merge(merged, read_yaml(path.parent / b, (*_seen, path)))
    return _merge(merged, d)


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (values parsed as YAML scalars/lists)."""
    out = _merge({}, d)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        try:
            value = parse_yaml(raw) if raw else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: {e}") from None
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return out


SAMPLE_PREFIX = "@sample/"


def resolve_sample_paths(d: dict[str, Any]) -> dict[str, Any]:
    """Replace the ``@sample/`` prefix of source paths by the embedded sample folder."""
    from basque_jax.data.sample import ASSETS

    def fix(path: Any) -> Any:
        if isinstance(path, list):
            return [fix(p) for p in path]
        if isinstance(path, str) and path.startswith(SAMPLE_PREFIX):
            return str(ASSETS / path[len(SAMPLE_PREFIX):])
        return path

    for section in ("data", "eval_data"):
        for src in (d.get(section) or {}).get("sources") or []:
            if isinstance(src, dict) and "path" in src:
                src["path"] = fix(src["path"])
    return d


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def interpolate(d: dict[str, Any], config_name: str) -> dict[str, Any]:
    """Substitute ``${name}`` in every string from the top-level ``vars:`` mapping (which is
    removed; vars may use each other) and ``${config_name}``."""
    d = dict(d)
    variables = d.pop("vars", None) or {}
    if not isinstance(variables, dict):
        raise ConfigError(f"vars: expected a mapping, got {type(variables).__name__}")
    table = {"config_name": config_name, **{str(k): v for k, v in variables.items()}}

    def sub(value: Any, where: str, depth: int = 0) -> Any:
        if isinstance(value, dict):
            return {k: sub(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [sub(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value
        if depth > 10:
            raise ConfigError(f"{where}: ${{...}} variables nest too deep (a cycle?)")

        def one(m: re.Match) -> str:
            if m.group(1) not in table:
                raise ConfigError(f"{where}: unknown variable ${{{m.group(1)}}}; define it "
                                  f"under vars: (known: {', '.join(sorted(table))})")
            return str(table[m.group(1)])

        return sub(_VAR.sub(one, value), where, depth + 1)

    return sub(d, "")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override and validate a run config (``@sample/`` paths name the embedded sample)."""
    d = interpolate(apply_overrides(read_yaml(path), list(overrides)), Path(path).stem)
    train = d.get("train") or {}
    if isinstance(train, dict) and train.get("epoch_tokens") is not None and "steps" in train:
        raise ConfigError("train.steps: set either train.steps or train.epoch_tokens (which "
                          "derives the steps); to run a fixed number of steps, also set "
                          "train.epoch_tokens=null")
    return RunConfig.from_dict(resolve_sample_paths(d))


