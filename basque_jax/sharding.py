"""Logical axis names and the ONE table that maps them to mesh axes.

Every parameter carries ``logical_axes`` metadata and every activation constraint names logical
axes only (:func:`constrain`); changing parallelism means changing :data:`DEFAULT_RULES` (or the
config's override of it), nothing else. Parameter axes and activation axes have distinct names
because FSDP shards weights along ``embed`` while activations stay whole along it.

Also here: the mesh from config (:class:`MeshConfig`, :func:`make_mesh`, :func:`validate_mesh`)
and placing a model's variables by their logical axes (:func:`param_shardings`,
:func:`shard_model`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from basque_jax.errors import ConfigError

if TYPE_CHECKING:
    from basque_jax.model.config import LlamaConfig

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
                raise ConfigError(
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


# --------------------------------------------------------------------------- mesh from config
MESH_AXES = ("dcn", "data", "fsdp", "tensor")


@dataclass(frozen=True)
class MeshConfig:
    """The ``mesh:`` section: axis sizes (``-1``, at most one: the devices left over) and
    overrides of the logical-axis table (``rules``, see :data:`DEFAULT_RULES`).

    ``dcn`` is the data-parallel axis across slices (multi-slice TPU, over the data-centre
    network); ``data``, ``fsdp`` and ``tensor`` run inside a slice over ICI.
    """

    dcn: int = 1
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for axis in MESH_AXES:
            size = getattr(self, axis)
            if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
                raise ConfigError(f"mesh.{axis}: size must be a positive integer or -1, "
                                  f"got {size!r}")
        rest = [a for a in MESH_AXES if getattr(self, a) == -1]
        if len(rest) > 1:
            raise ConfigError(f"mesh: only one axis may be -1, got {' and '.join(rest)}")
        rules_with_overrides(self.rules)

    @property
    def rule_table(self) -> dict[str, MeshAxes]:
        """:data:`DEFAULT_RULES` with this config's ``rules`` applied."""
        return rules_with_overrides(self.rules)

    def sizes(self, num_devices: int) -> dict[str, int]:
        """Every axis size resolved for ``num_devices`` devices; ConfigError if impossible."""
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        rest = [a for a, s in sizes.items() if s == -1]
        fixed = math.prod(s for s in sizes.values() if s != -1)
        shape = " × ".join(f"{a}={s}" for a, s in sizes.items())
        if rest:
            if num_devices % fixed:
                raise ConfigError(f"mesh {shape}: the fixed axes multiply to {fixed}, which "
                                  f"does not divide the {num_devices} devices")
            sizes[rest[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise ConfigError(f"mesh {shape} has {fixed} devices but {num_devices} are "
                              "available; sizes must multiply to the device count (or use -1)")
        return sizes


def device_grid(cfg: MeshConfig, devices: Sequence | None = None) -> np.ndarray:
    """Devices arranged ``[dcn, data, fsdp, tensor]`` for good collective performance.

    Devices from several TPU slices (``slice_index``) need ``dcn`` = the slice count: each dcn
    row is then one slice (``create_hybrid_device_mesh``). Otherwise the topology-aware
    ``create_device_mesh`` lays out all four axes.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = cfg.sizes(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) > 1:
        if sizes["dcn"] != len(slices):
            raise ConfigError(f"the devices span {len(slices)} slices but mesh.dcn is "
                             f"{sizes['dcn']}; set mesh.dcn={len(slices)}")
        return mesh_utils.create_hybrid_device_mesh(
            (1, *shape[1:]), (sizes["dcn"], 1, 1, 1), devices, allow_split_physical_axes=True)
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)


def make_mesh(cfg: MeshConfig, devices: Sequence | None = None) -> Mesh:
    """A ``(dcn, data, fsdp, tensor)`` mesh with Auto axis types (sharding by propagation)."""
    return Mesh(device_grid(cfg, devices), MESH_AXES, axis_types=(AxisType.Auto,) * 4)


def mesh_and_rules(cfg: MeshConfig, devices: Sequence | None = None
                   ) -> tuple[Mesh, dict[str, MeshAxes]]:
    """The mesh of ``cfg`` over ``devices`` (default: all) and its logical-axis table."""
    return make_mesh(cfg, devices), cfg.rule_table


def axis_names(axes: MeshAxes) -> tuple[str, ...]:
    """A rule's mesh axes as a tuple (``"fsdp"`` -> ``("fsdp",)``, None -> ``()``)."""
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def mesh_size(mesh: Mesh, axes: MeshAxes) -> int:
    """Devices along ``axes`` of ``mesh`` (1 for axes the mesh lacks)."""
    return math.prod(mesh.shape.get(a, 1) for a in axis_names(axes))


def batch_sharding(mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None) -> NamedSharding:
    """How ``[batch, sequence]`` input arrays are laid out: rows over the axes the table maps
    ``batch`` to (the only place input batches get their sharding from)."""
    table = DEFAULT_RULES if rules is None else rules
    return NamedSharding(mesh, logical_to_spec(("batch", "sequence"), table, mesh))


def batch_shards(mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None) -> int:
    """How many shards the batch dimension is split into on ``mesh``."""
    return mesh_size(mesh, (DEFAULT_RULES if rules is None else rules).get("batch"))


def validate_mesh(mesh: Mesh, config: LlamaConfig, global_batch_size: int,
                  rules: Mapping[str, MeshAxes] | None = None) -> None:
    """ConfigError, naming the numbers, if ``config`` or the batch cannot be split on ``mesh``.

    Checks attention heads and KV heads against the ``tensor`` axis (whole heads per device),
    every sharded parameter dimension against its mesh axes under ``rules``, and the global batch
    against the batch-sharding axes.
    """
    table = DEFAULT_RULES if rules is None else rules
    tensor = mesh.shape.get("tensor", 1)
    for what, n in (("attention heads", config.num_attention_heads),
                    ("KV heads", config.num_key_value_heads)):
        if n % tensor:
            raise ConfigError(f"{n} {what} are not divisible by the tensor axis size {tensor}")
    dims = {"vocab": ("vocab_size", config.vocab_size),
            "embed": ("hidden_size", config.hidden_size),
            "mlp": ("intermediate_size", config.intermediate_size),
            "heads": ("num_attention_heads", config.num_attention_heads),
            "kv_heads": ("num_key_value_heads", config.num_key_value_heads),
            "layers": ("num_hidden_layers", config.num_hidden_layers)}
    for axis, (key, n) in dims.items():
        size = mesh_size(mesh, table.get(axis))
        if n % size:
            raise ConfigError(f"{key}={n} is not divisible by {size}, the size of mesh axes "
                              f"{table.get(axis)!r} that shard logical axis {axis!r}")
    batch_axes = axis_names(table.get("batch"))
    size = mesh_size(mesh, batch_axes)
    if global_batch_size % size:
        parts = " × ".join(f"{a}={mesh.shape.get(a, 1)}" for a in batch_axes)
        raise ConfigError(f"global batch size {global_batch_size} is not divisible by {size}, "
                          f"the batch-sharding mesh axes ({parts})")


def rules_with_overrides(overrides: Mapping[str, Any]) -> dict[str, MeshAxes]:
    """:data:`DEFAULT_RULES` with ``overrides`` applied (lists become tuples).

    Keys must be logical axes, values a mesh axis name, a list of them, or None.
    """
    rules = dict(DEFAULT_RULES)
    for key, value in overrides.items():
        if key not in LOGICAL_AXES:
            raise ConfigError(f"mesh.rules.{key}: unknown logical axis; known: "
                             f"{', '.join(LOGICAL_AXES)}")
        names = [value] if isinstance(value, str) else value
        if value is not None and (not isinstance(names, list | tuple)
                                  or any(n not in MESH_AXES for n in names)):
            raise ConfigError(f"mesh.rules.{key}: expected a mesh axis of {MESH_AXES}, a list "
                             f"of them, or null; got {value!r}")
        rules[key] = value if value is None or isinstance(value, str) else tuple(value)
    return rules


# --------------------------------------------------------------------------- placing models
def _variable_sharding(var: nnx.Variable, mesh: Mesh, rules: Mapping[str, MeshAxes]
                       ) -> NamedSharding:
    axes = getattr(var, "logical_axes", None)
    if axes is None:
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, logical_to_spec(axes, rules, mesh))


def param_shardings(model_or_state: Any, mesh: Mesh,
                    rules: Mapping[str, MeshAxes] | None = None) -> Any:
    """NamedSharding of every variable, in the tree of ``nnx.state(model_or_state)``.

    Shardings come from each variable's ``logical_axes`` metadata (optimizer moments inherit
    their parameter's); variables without it (step counters) are replicated. A graph node
    (module, ``nnx.Optimizer``) is turned into its state first; a state is used as given.
    """
    table = DEFAULT_RULES if rules is None else rules
    state = model_or_state
    if nnx.graph.is_graph_node(state):
        state = nnx.state(state)
    return jax.tree.map(lambda v: v.replace(_variable_sharding(v, mesh, table)), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None
                ) -> nnx.Module:
    """Place every variable of ``model`` on its sharding (in place; returns ``model``)."""
    table = DEFAULT_RULES if rules is None else rules
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable):
            var.set_value(place(var.get_value(), _variable_sharding(var, mesh, table)))
    return model


def place(value: Any, sharding: NamedSharding) -> jax.Array:
    """``jax.device_put`` that also works across hosts: a value held whole by this process
    (e.g. a seeded random init, which every process computes alike) becomes a global array of
    which each process supplies its own shards."""
    multi_host = not sharding.is_fully_addressable
    if multi_host and getattr(value, "is_fully_addressable", True):
        host = np.asarray(jax.device_get(value))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.device_put(value, sharding)


def to_host(tree: Any) -> Any:
    """Arrays of ``tree`` as whole numpy arrays, in one transfer; an array spread over several
    hosts is gathered with ``process_allgather`` (every process must then fetch the same
    arrays in the same order)."""
    def spread(x: Any) -> bool:
        return isinstance(x, jax.Array) and not x.is_fully_addressable

    if not any(map(spread, jax.tree.leaves(tree))):
        return jax.tree.map(np.asarray, jax.device_get(tree))
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
                        if spread(x) else np.asarray(jax.device_get(x)), tree)


def abstract_state(state: Any, mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None) -> Any:
    """``ShapeDtypeStruct`` s of an abstract (``nnx.eval_shape``) state, each carrying the
    sharding its logical axes give on ``mesh`` (targets for restoring or AOT compiling)."""
    shardings = param_shardings(state, mesh, rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)
