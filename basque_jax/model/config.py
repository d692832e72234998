"""Typed Llama 3.x configuration: presets, validation, and Hugging Face ``config.json`` I/O.

Reads both the classic ``rope_theta`` + ``rope_scaling`` keys and transformers 5's
``rope_parameters``; writes the classic keys (what Meta's released checkpoints carry and what every
transformers version and vLLM read).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from basque_jax.errors import ConfigError, InputNotFound
from basque_jax.yaml_config import read_json_object

ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")  # what parameters and activations may be held in


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (``rope_type`` ``llama3`` or ``linear``; ``default`` means none)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"unknown rope_type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
            )
        if self.rope_type != "default" and self.factor <= 0:
            raise ConfigError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(
                "llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                f"{self.high_freq_factor} <= {self.low_freq_factor}"
            )


@dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama 3.x decoder (Hugging Face field names)."""

    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; set head_dim explicitly"
            )
        if self.head_dim is not None and (self.head_dim <= 0 or self.head_dim % 2):
            raise ConfigError(f"head_dim must be a positive even integer, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")

    @property
    def resolved_head_dim(self) -> int:
        """``head_dim`` if given, else ``hidden_size // num_attention_heads``."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def num_parameters(self) -> int:
        """Exact parameter count (as transformers counts it for the same config)."""
        h, hd = self.hidden_size, self.resolved_head_dim
        q = h * self.num_attention_heads * hd
        kv = 2 * h * self.num_key_value_heads * hd
        o = self.num_attention_heads * hd * h
        mlp = 3 * h * self.intermediate_size
        per_layer = q + kv + o + mlp + 2 * h
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embed + head + self.num_hidden_layers * per_layer + h

    def replace(self, **changes: Any) -> LlamaConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str) -> LlamaConfig:
        """A named configuration; see :data:`PRESETS`."""
        try:
            return PRESETS[name]
        except KeyError:
            raise ConfigError(
                f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}"
            ) from None

    # ---------------------------------------------------------------- HF I/O
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config.json") -> LlamaConfig:
        """Build from a Hugging Face ``config.json`` dict; ``source`` names it in errors."""
        model_type = d.get("model_type", "llama")
        if model_type != "llama":
            raise ConfigError(f"{source}: model_type {model_type!r} is not 'llama'")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {d['hidden_act']!r} unsupported (need silu)")
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key):
                raise ConfigError(f"{source}: {key}=true is not a Llama 3 architecture")
        missing = [k for k in _REQUIRED_HF_KEYS if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing key(s) {', '.join(missing)}")
        rope_theta, scaling = _read_rope(d, source)
        try:
            return cls(
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=d["num_attention_heads"],
                num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
                head_dim=_explicit_head_dim(d),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                rope_theta=rope_theta,
                rope_scaling=scaling,
                max_position_embeddings=d.get("max_position_embeddings", 131072),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                initializer_range=float(d.get("initializer_range", 0.02)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"),
                pad_token_id=d.get("pad_token_id"),
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_hf_file(cls, path: str | Path) -> LlamaConfig:
        """Read a ``config.json`` file (or the one inside a model folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise InputNotFound(f"{path}: no such config.json")
        return cls.from_hf_dict(read_json_object(path), source=str(path))

    def to_hf_dict(self, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        """The ``config.json`` dict transformers (4.x and 5.x) and vLLM read."""
        d: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.resolved_head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "pretraining_tp": 1,
            "use_cache": True,
            "torch_dtype": torch_dtype,
        }
        s = self.rope_scaling
        if s.rope_type == "llama3":
            d["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            }
        elif s.rope_type == "linear":
            d["rope_scaling"] = {"rope_type": "linear", "factor": s.factor}
        return d

    def save_hf(self, folder: str | Path, torch_dtype: str = "bfloat16") -> None:
        """Write ``config.json`` into ``folder``."""
        path = Path(folder) / "config.json"
        path.write_text(json.dumps(self.to_hf_dict(torch_dtype), indent=2) + "\n")


_REQUIRED_HF_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def _explicit_head_dim(d: dict[str, Any]) -> int | None:
    """``head_dim`` only when it differs from ``hidden_size // num_attention_heads``."""
    head_dim = d.get("head_dim")
    if head_dim is not None and d["hidden_size"] == head_dim * d["num_attention_heads"]:
        return None
    return head_dim


def _read_rope(d: dict[str, Any], source: str) -> tuple[float, RopeScaling]:
    """Rope theta and scaling from either the classic or the transformers-5 keys."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = dict(params)
    else:
        theta = d.get("rope_theta", 10000.0)
        scaling = dict(d.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"{source}: unknown rope_type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
        )
    if rope_type == "llama3":
        needed = ("factor", "low_freq_factor", "high_freq_factor",
                  "original_max_position_embeddings")
        missing = [k for k in needed if k not in scaling]
        if missing:
            raise ConfigError(f"{source}: llama3 rope scaling lacks {', '.join(missing)}")
    if rope_type == "linear" and "factor" not in scaling:
        raise ConfigError(f"{source}: linear rope scaling lacks factor")
    try:
        rs = RopeScaling(
            rope_type=rope_type,
            factor=float(scaling.get("factor", 1.0)),
            low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                scaling.get("original_max_position_embeddings", 8192)
            ),
        )
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return float(theta), rs


_LLAMA31_ROPE = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
_LLAMA32_ROPE = RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
_LLAMA3_STOP = [128001, 128008, 128009]

PRESETS: dict[str, LlamaConfig] = {
    "llama3.1-8b": LlamaConfig(rope_scaling=_LLAMA31_ROPE, eos_token_id=_LLAMA3_STOP),
    "llama3.1-70b": LlamaConfig(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, rope_scaling=_LLAMA31_ROPE,
        eos_token_id=_LLAMA3_STOP,
    ),
    "llama3.1-405b": LlamaConfig(
        hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
        num_attention_heads=128, num_key_value_heads=8, rope_scaling=_LLAMA31_ROPE,
        eos_token_id=_LLAMA3_STOP,
    ),
    "llama3.2-1b": LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        rope_scaling=_LLAMA32_ROPE, tie_word_embeddings=True, eos_token_id=_LLAMA3_STOP,
    ),
    "llama3.2-3b": LlamaConfig(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128,
        rope_scaling=_LLAMA32_ROPE, tie_word_embeddings=True, eos_token_id=_LLAMA3_STOP,
    ),
    # Tiny sizes for tests and the CPU demo (Llama 3.1-style rope scaling, GQA).
    "tiny": LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_scaling=_LLAMA31_ROPE,
        bos_token_id=None, eos_token_id=None,
    ),
    "tiny-tied": LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, rope_scaling=_LLAMA32_ROPE,
        tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None,
    ),
    # The demo: fits the embedded sample's byte-level BPE (~1k entries + 256 Llama 3.1 specials).
    "demo": LlamaConfig(
        vocab_size=1280, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, rope_scaling=_LLAMA31_ROPE,
        bos_token_id=None, eos_token_id=None,
    ),
    # The shape benchmarks/ compare against transformers (hidden 512, 4 layers, vocab 32000).
    "bench": LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, rope_scaling=_LLAMA31_ROPE,
        max_position_embeddings=8192, bos_token_id=None, eos_token_id=None,
    ),
    # SmolLM2-135M's shape (the real model of the tests), for the benchmarks' random weights.
    "smollm2-135m": LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=None,
    ),
}
