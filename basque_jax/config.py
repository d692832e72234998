"""The run configuration: typed sections read from YAML plus ``key=value`` overrides.

``load_config("configs/demo.yaml", ["optim.lr=3e-4", "lora.rank=8"])`` validates everything and
raises :class:`ConfigError` naming the key (``train.steps: expected int, got str 'ten'``) for
unknown keys, wrong types and impossible values. A YAML file may name ``base: other.yaml``
(relative to itself) whose values it overrides, so configs compose without copy-paste.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from basque_jax.data.config import ConfigError, DataConfig, _build
from basque_jax.model.llama import REMAT_POLICIES
from basque_jax.sharding import LOGICAL_AXES

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


@dataclass
class LoraSection:
    """LoRA adapters; ``enabled: false`` means full fine-tuning."""

    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    use_rslora: bool = False
    base_dtype: str | None = None

    def __post_init__(self) -> None:
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
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 4
    save_every: int = 0
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    progress_bar: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        for key in ("steps", "micro_batches", "log_every", "eval_batches", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("eval_every", "save_every", "neftune_alpha", "z_loss"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: must be >= 0, got {getattr(self, key)}")


@dataclass
class RunConfig:
    """Everything one ``basque-jax train`` run needs."""

    model: ModelSection
    data: DataConfig
    lora: LoraSection = field(default_factory=LoraSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval_data: DataConfig | None = None

    def __post_init__(self) -> None:
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


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
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
        return d
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


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override and validate a run config (``@sample/`` paths name the embedded sample)."""
    return RunConfig.from_dict(resolve_sample_paths(apply_overrides(read_yaml(path),
                                                                    list(overrides))))


