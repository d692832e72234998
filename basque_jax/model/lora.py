"""LoRA adapters on the Llama projections, with peft semantics.

``y = x W + B(A(dropout(x))) * scale`` with ``scale = alpha / r`` (or ``alpha / sqrt(r)`` for
rsLoRA). A ``[L, in, r]`` starts kaiming-uniform like peft (``U(±1/sqrt(in))``) and B
``[L, r, out]`` starts at zero, so an adapted model first computes exactly the base model.
Adapters are ``nnx.LoRAParam`` in float32 whose logical axes follow the base kernel's: A keeps
the input-dim axis (rank replicated), B keeps the output-dim axis.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from basque_jax.errors import ConfigError, UserError
from basque_jax.model.config import DTYPES
from basque_jax.model.llama import Linear

# HF projection name → its parent module inside a decoder layer.
TARGETS: dict[str, str] = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
ALL_TARGETS: tuple[str, ...] = tuple(TARGETS)
ADAPTER_DTYPE = jnp.float32


METADATA_FIELDS = ("rank", "alpha", "dropout", "targets", "use_rslora", "base_model")


@dataclass(frozen=True)
class LoraConfig:
    """Adapters on the projections (the run config's ``lora:`` section).

    rank / alpha / dropout / targets (HF projection names) / use_rslora: the adapters.
    base_model: the backbone's name, recorded in checkpoints and PEFT exports.
    enabled: a training run attaches adapters (false: full fine-tuning); ``apply_lora``
      itself ignores it. base_dtype: cast the frozen base to this dtype (e.g. bfloat16).
    init_from: a PEFT adapter folder to continue training from; its rank, alpha, targets and
      rsLoRA then replace the ones given here (``dropout`` stays).
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ALL_TARGETS
    use_rslora: bool = False
    base_model: str | None = None
    enabled: bool = False
    base_dtype: str | None = None
    init_from: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ConfigError(f"lora.rank: must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha: must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ConfigError(f"lora.targets: unknown {unknown or 'empty list'}; choose from "
                              f"{ALL_TARGETS}")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"lora.targets: duplicate targets in {list(self.targets)}")
        if self.base_dtype is not None and self.base_dtype not in DTYPES:
            raise ConfigError(f"lora.base_dtype: expected one of {DTYPES}, got "
                              f"{self.base_dtype!r}")
        if self.init_from and not self.enabled:
            raise ConfigError("lora.init_from: set lora.enabled: true to train the adapter")

    @property
    def scale(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_metadata(self) -> dict[str, Any]:
        """What a checkpoint or PEFT export records: the adapters' own fields."""
        d = {f: getattr(self, f) for f in METADATA_FIELDS}
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_metadata(cls, d: dict[str, Any]) -> LoraConfig:
        """Inverse of :meth:`to_metadata`."""
        return cls(**{f: d[f] for f in METADATA_FIELDS if f in d})


def _targeted(model: nnx.Module, targets: Sequence[str]) -> Iterator[tuple[str, Linear]]:
    """``(target, Linear)`` for every projection named in ``targets`` inside ``model``."""
    for path, node in nnx.iter_graph(model):
        if not (isinstance(node, Linear) and path and path[-1] in targets):
            continue
        if len(path) == 1 or path[-2] == TARGETS[path[-1]]:  # parent right: self_attn.q_proj
            yield str(path[-1]), node


def _kernel_spec(kernel: jax.Array) -> tuple[NamedSharding | None, tuple]:
    """A placed kernel's NamedSharding (None otherwise) and its spec padded to the rank."""
    sharding = getattr(kernel, "sharding", None)  # tracers and abstract values have none
    if not isinstance(sharding, NamedSharding):
        return None, (None,) * kernel.ndim
    spec = tuple(sharding.spec)
    return sharding, spec + (None,) * (kernel.ndim - len(spec))


@dataclass(frozen=True)
class _Plan:
    """Shapes, init bound, logical axes and shardings of one projection's adapters."""

    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    bound: float
    a_axes: tuple[str, ...]
    b_axes: tuple[str, ...]
    a_sharding: jax.sharding.Sharding | None
    b_sharding: jax.sharding.Sharding | None


def _plan(linear: Linear, rank: int) -> _Plan:
    kernel = linear.kernel[...]
    *lead, fan_in, fan_out = kernel.shape
    *lead_axes, in_axis, out_axis = linear.kernel.logical_axes
    a_sharding = b_sharding = getattr(kernel, "sharding", None)
    named, kspec = _kernel_spec(kernel)
    if named is not None:  # A: the base input-dim spec, rank replicated; B: the output-dim spec
        a_sharding = NamedSharding(named.mesh, PartitionSpec(*kspec[:-1], None))
        b_sharding = NamedSharding(named.mesh, PartitionSpec(*kspec[:-2], None, kspec[-1]))
    return _Plan((*lead, fan_in, rank), (*lead, rank, fan_out), 1.0 / math.sqrt(fan_in),
                 (*lead_axes, in_axis, "lora_rank"), (*lead_axes, "lora_rank", out_axis),
                 a_sharding, b_sharding)


def _init_adapters(plans: list[_Plan], keys: list[jax.Array]) -> list[tuple[jax.Array, ...]]:
    """A ~ U(±1/sqrt(in)) (peft's kaiming-uniform, a=sqrt(5)) and B = 0, in one compiled call."""

    def init(keys):
        return [(jax.random.uniform(k, p.a_shape, ADAPTER_DTYPE, -p.bound, p.bound),
                 jnp.zeros(p.b_shape, ADAPTER_DTYPE)) for k, p in zip(keys, plans, strict=True)]

    shardings = [(p.a_sharding, p.b_sharding) for p in plans]
    if any(s is None for pair in shardings for s in pair):  # abstract (traced) model
        return jax.jit(init)(keys)
    return jax.jit(init, out_shardings=shardings)(keys)


def apply_lora(model: nnx.Module, cfg: LoraConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Attach fresh adapters to every targeted projection of ``model`` (in place; returned).

    Adapters are created directly on the sharding derived from their kernel's (see module
    docstring). Raises ValueError when a target matches no projection or adapters exist.
    """
    found = list(_targeted(model, cfg.targets))
    missing = [t for t in cfg.targets if t not in {name for name, _ in found}]
    if missing:
        raise UserError(f"LoRA targets {missing} match no projection in "
                         f"{type(model).__name__}")
    for name, linear in found:
        if linear.lora_a is not None:
            raise UserError(f"{name} already has LoRA adapters; merge_lora first")
    plans = [_plan(linear, cfg.rank) for _, linear in found]
    arrays = _init_adapters(plans, [rngs.params() for _ in found])
    for (_, linear), plan, (a, b) in zip(found, plans, arrays, strict=True):
        linear.lora_a = nnx.LoRAParam(a, logical_axes=plan.a_axes)
        linear.lora_b = nnx.LoRAParam(b, logical_axes=plan.b_axes)
        linear.lora_scale = cfg.scale
        linear.lora_dropout = cfg.dropout
    model.lora_config = cfg
    return model


def _adapted(model: nnx.Module) -> list[Linear]:
    return [n for _, n in nnx.iter_graph(model) if isinstance(n, Linear) and n.lora_a is not None]


def has_lora(model: nnx.Module) -> bool:
    """Whether any projection of ``model`` carries adapters."""
    return bool(_adapted(model))


def cast_frozen(model: nnx.Module, dtype: jnp.dtype) -> nnx.Module:
    """Cast every non-LoRA parameter to ``dtype`` in place (e.g. a bf16 frozen base)."""
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and not isinstance(var, nnx.LoRAParam):
            var.set_value(var.get_value().astype(dtype))
    if hasattr(model, "param_dtype"):
        model.param_dtype = jnp.dtype(dtype)
    return model


def _merge_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its kernel (float32 math, base dtype kept) and drop adapters.

    In place; returns ``model``. Kernels keep their sharding.
    """
    adapted = _adapted(model)
    if not adapted:
        raise ValueError("model has no LoRA adapters to merge")
    for linear in adapted:
        kernel = linear.kernel[...]
        sharding, _ = _kernel_spec(kernel)
        merged = jax.jit(_merge_kernel, static_argnums=3, out_shardings=sharding)(
            kernel, linear.lora_a[...], linear.lora_b[...], float(linear.lora_scale))
        linear.kernel.set_value(merged)
        linear.lora_a = None
        linear.lora_b = None
        linear.lora_scale = 0.0
        linear.lora_dropout = 0.0
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def lora_metadata(model: nnx.Module) -> dict[str, Any] | None:
    """``{rank, alpha, dropout, targets, use_rslora, base_model}`` for checkpoint metadata.

    None when the model carries no adapters (full fine-tuning).
    """
    cfg = getattr(model, "lora_config", None)
    if cfg is None or not has_lora(model):
        return None
    return cfg.to_metadata()


def trainable_filter(mode: Literal["lora", "full"], model: nnx.Module | None = None
                     ) -> nnx.filterlib.Filter:
    """The nnx filter of trainable variables: adapters (``lora``) or base parameters (``full``).

    ``nnx.LoRAParam`` subclasses ``nnx.Param``, so ``full`` excludes adapters explicitly. Given a
    ``model``, also checks it matches the mode (adapters for ``lora``, none for ``full``).
    """
    if mode not in ("lora", "full"):
        raise ValueError(f"unknown training mode {mode!r}; choose 'lora' or 'full'")
    if model is not None:
        adapted = has_lora(model)
        if mode == "lora" and not adapted:
            raise ValueError("mode 'lora' but the model has no adapters; call apply_lora first")
        if mode == "full" and adapted:
            raise ValueError("mode 'full' but the model has LoRA adapters; full fine-tuning "
                             "trains the base weights only (merge_lora first)")
    if mode == "lora":
        return nnx.LoRAParam
    return nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
