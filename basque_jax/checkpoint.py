"""Orbax checkpoints of a run: train state, data-iterator state, config and LoRA metadata.

Written by the training loop, read by everything that loads a run (``basque_jax.runs``,
export). The train state is saved as a flat ``{key path: array}`` mapping so any pytree
(nnx.State, optax states) round-trips; restoring takes target shardings from the caller's
state, so a checkpoint written on one mesh restores onto another, and
:meth:`Checkpointer.restore_params` reads the trained parameters alone (no optimizer state).
Saves are asynchronous, keep the last K, and an interrupted save never shadows the last
complete one (orbax commits atomically).
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from basque_jax.errors import InputNotFound, UserError


def flatten_state(tree: Any) -> dict[str, Any]:
    """``{jax.tree_util.keystr(path): leaf}`` for every leaf of ``tree``."""
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten_state(like: Any, flat: dict[str, Any]) -> Any:
    """Inverse of :func:`flatten_state` using ``like`` for the tree structure."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    missing = [jax.tree_util.keystr(p) for p, _ in paths if jax.tree_util.keystr(p) not in flat]
    if missing:
        raise UserError(f"checkpoint lacks {len(missing)} entries, e.g. {missing[:3]} (was it "
                        "written by another model or LoRA configuration?)")
    return jax.tree_util.tree_unflatten(treedef, [flat[jax.tree_util.keystr(p)]
                                                  for p, _ in paths])


class Checkpointer:
    """Save/restore a run under ``directory`` (``<dir>/<step>/{state,data,meta}``), a local
    folder or a ``gs://`` URI (orbax writes arrays with tensorstore, the rest via epath)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        path = os.fspath(directory)
        self.directory = epath.Path(path if "://" in path else os.path.abspath(path))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None,
             meta: dict[str, Any], *, force: bool = False) -> bool:
        """Save ``step``. A data iterator with a global state (prepared data: the same on every
        process) goes into the metadata, so it restores on any number of processes; any other
        is saved per process by grain's handler."""
        meta = {**meta, "processes": jax.process_count()}
        items: dict[str, Any] = {"state": ocp.args.StandardSave(flatten_state(state))}
        if data_iterator is not None:
            data_state = data_iterator.get_state()
            if isinstance(data_state, dict) and data_state.get("global"):
                meta["data_state"] = data_state
            else:
                items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        items["meta"] = ocp.args.JsonSave(meta)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, like_state: Any,
                data_iterator: grain.DatasetIterator | None) -> tuple[Any, dict[str, Any]]:
        """Restore ``step`` onto the shardings of ``like_state``; the iterator is set in place."""
        meta = self.read_meta(step)
        targets = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            flatten_state(like_state))
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(targets)}
        per_process = data_iterator is not None and "data_state" not in meta
        if per_process:
            saved = meta.get("processes", jax.process_count())
            if saved != jax.process_count():
                raise UserError(f"{self.directory}/{step}: the data position was saved by "
                                f"{saved} processes and this run has {jax.process_count()}; "
                                "resume on as many hosts, or train from prepared data "
                                "(data.prepared), whose position is global")
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if data_iterator is not None and not per_process:
            data_iterator.set_state(meta["data_state"])
        return unflatten_state(like_state, restored["state"]), meta

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of ``step`` (default: latest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise InputNotFound(f"{self.directory}: no checkpoint")
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def restore_params(self, step: int, like_params: Any) -> Any:
        """The trainable parameters of ``step`` alone, placed like ``like_params`` (arrays or
        ``ShapeDtypeStruct`` s with shardings); the optimizer state is never read."""
        flat = {".params" + k: v for k, v in flatten_state(like_params).items()}
        targets = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), flat)
        args = ocp.args.PyTreeRestore(
            item=targets, restore_args=ocp.checkpoint_utils.construct_restore_args(targets),
            partial_restore=True)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]
        return unflatten_state(like_params, {k[len(".params"):]: v
                                             for k, v in restored.items()})

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
