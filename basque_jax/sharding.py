"""Logical axis names and the ONE table that maps them to mesh axes.

Every parameter carries ``logical_axes`` metadata and every activation constraint names logical
axes only (:func:`constrain`); changing parallelism means changing :data:`DEFAULT_RULES` (or the
config's override of it), nothing else. Parameter axes and activation axes have distinct names
because FSDP shards weights along ``embed`` while activations stay whole along it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None

# Parameter axes.
PARAM_AXES = ("layers", "vocab", "embed", "heads", "kv_heads", "mlp", "norm", "lora_rank")
# Activation axes.
ACTIVATION_AXES = (
    "batch", "sequence", "act_embed", "act_heads", "act_kv_heads", "head_dim", "act_mlp",
    "act_vocab", "cache_sequence",
)
LOGICAL_AXES = PARAM_AXES + ACTIVATION_AXES

DEFAULT_RULES: dict[str, MeshAxes] = {
    # parameters: FSDP over the model dimension, tensor parallel over heads / MLP / vocab
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "lora_rank": None,
    # activations: batch over data-parallel axes, features over tensor
    "batch": ("dcn", "data", "fsdp"),
    "sequence": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "head_dim": None,
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "cache_sequence": None,
}


@dataclass(frozen=True)
class ShardingContext:
    """A mesh plus the logical → mesh axis rules in force."""

    mesh: Mesh
    rules: Mapping[str, MeshAxes]

    def spec(self, logical_axes: Sequence[str | None]) -> PartitionSpec:
        """PartitionSpec for ``logical_axes`` under these rules (absent mesh axes dropped)."""
        return logical_to_spec(logical_axes, self.rules, self.mesh)

    def sharding(self, logical_axes: Sequence[str | None]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes))


def logical_to_spec(
    logical_axes: Sequence[str | None], rules: Mapping[str, MeshAxes], mesh: Mesh | None = None
) -> PartitionSpec:
    """Translate logical axis names to a PartitionSpec.

    Mesh axes that the mesh lacks (or that have size 1) are dropped; a mesh axis used twice in one
    spec is an error naming both logical axes.
    """
    used: dict[str, str] = {}
    out: list[MeshAxes] = []
    for name in logical_axes:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        target = rules[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        if mesh is not None:
            axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
        for a in axes:
            if a in used:
                raise ValueError(
                    f"mesh axis {a!r} used by both logical axes {used[a]!r} and {name!r} "
                    f"in {tuple(logical_axes)}"
                )
            used[a] = name
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


_CONTEXT: contextvars.ContextVar[ShardingContext | None] = contextvars.ContextVar(
    "basque_jax_sharding", default=None
)


@contextlib.contextmanager
def use_sharding(mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None) -> Iterator[
    ShardingContext
]:
    """Within this block, :func:`constrain` pins activations to ``mesh`` under ``rules``."""
    ctx = ShardingContext(mesh, dict(DEFAULT_RULES if rules is None else rules))
    token = _CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.reset(token)


def current_sharding() -> ShardingContext | None:
    """The active :class:`ShardingContext`, or None outside :func:`use_sharding`."""
    return _CONTEXT.get()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical axes; a no-op outside :func:`use_sharding`."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return x
    if len(logical_axes) != x.ndim:
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, ctx.sharding(logical_axes))
