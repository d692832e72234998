"""Everything a run needs before its first batch: mesh, split model, optimizer state, step.

``setup_training(cfg)`` places the initial model (:func:`basque_jax.runs.initial_model`),
splits it into trainable (adapters, or every base parameter) and frozen state, builds the
optimizer state on the parameters' shardings and compiles nothing yet (the jitted step compiles
on its first call). ``assemble_setup(..., abstract=True)`` does the same with
``ShapeDtypeStruct`` s only, for ahead-of-time compilation (``basque-jax plan``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from basque_jax.config import RunConfig
from basque_jax.data.batch import make_global_batch
from basque_jax.model.config import LlamaConfig
from basque_jax.model.llama import Llama
from basque_jax.model.lora import lora_metadata, trainable_filter
from basque_jax.runs import initial_model
from basque_jax.sharding import (
    abstract_state,
    batch_sharding,
    mesh_and_rules,
    use_sharding,
    validate_mesh,
)
from basque_jax.train.optim import make_optimizer
from basque_jax.train.step import TrainState, jit_step, make_step_fn


def opt_state_shardings(optimizer: optax.GradientTransformation, params: Any) -> Any:
    """Shardings for the optimizer state: a leaf whose key path ends with a parameter's path
    (Adam moments) takes that parameter's sharding; everything else is replicated."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    by_path = {p: x.sharding for p, x in flat}
    shapes = {p: x.shape for p, x in flat}
    replicated = NamedSharding(next(iter(by_path.values())).mesh, PartitionSpec())

    def pick(path, leaf):
        for n in range(len(path)):
            sh = by_path.get(path[n:])
            if sh is not None and leaf.shape == shapes[path[n:]]:
                return sh
        return replicated

    return jax.tree_util.tree_map_with_path(pick, jax.eval_shape(optimizer.init, params))


@dataclass
class TrainSetup:
    """Mesh, split model, optimizer and the jitted step of one run."""

    mesh: Mesh
    rules: dict[str, Any]
    model_config: LlamaConfig
    mode: str
    graphdef: nnx.GraphDef
    state: TrainState
    frozen: nnx.State
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    batch_sharding: NamedSharding
    step_fn: Any
    lora_meta: dict[str, Any] | None

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This host's rows → global arrays sharded over the batch axes."""
        return make_global_batch(local, self.batch_sharding)


def setup_training(cfg: RunConfig, devices=None) -> TrainSetup:
    """Build mesh, model (+LoRA), trainable/frozen split, optimizer state and the jitted step.

    Call (and use the result) inside ``use_sharding(setup.mesh, setup.rules)``.
    """
    mesh, rules = mesh_and_rules(cfg.mesh, devices)
    with use_sharding(mesh, rules):
        return assemble_setup(cfg, mesh, rules, initial_model(cfg, mesh, rules))


def assemble_setup(cfg: RunConfig, mesh: Mesh, rules: dict[str, Any], model: Llama, *,
                   abstract: bool = False) -> TrainSetup:
    """Split ``model``, build the optimizer state and the jitted step (call under
    ``use_sharding``). ``abstract``: ``model`` comes from ``nnx.eval_shape`` and every state
    array is a sharded ``ShapeDtypeStruct`` (nothing is allocated; for AOT compilation)."""
    validate_mesh(mesh, model.config, cfg.data.batch_size, rules)
    mode = "lora" if cfg.lora.enabled else "full"
    model_config = model.config
    lora_meta = lora_metadata(model) if mode == "lora" else None
    graphdef, params, frozen = nnx.split(model, trainable_filter(mode), ...)
    del model
    optimizer, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    replicated = NamedSharding(mesh, PartitionSpec())
    if abstract:
        params = abstract_state(params, mesh, rules)
        frozen = abstract_state(frozen, mesh, rules)
        opt_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            jax.eval_shape(optimizer.init, params), opt_state_shardings(optimizer, params))
        step0 = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    else:
        opt_state = jax.jit(optimizer.init,
                            out_shardings=opt_state_shardings(optimizer, params))(params)
        step0 = jax.device_put(jnp.zeros((), jnp.int32), replicated)
    state = TrainState(step0, params, opt_state)
    b_sharding = batch_sharding(mesh, rules)
    step_fn = jit_step(make_step_fn(graphdef, optimizer, schedule, cfg.train), state, frozen,
                       b_sharding)
    return TrainSetup(mesh, rules, model_config, mode, graphdef, state, frozen, optimizer,
                      schedule, b_sharding, step_fn, lora_meta)
