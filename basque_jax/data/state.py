"""Checkpointable iterator state: JSON bytes, files, and orbax (with the training checkpoint).

The pipeline iterator's ``get_state()`` is a JSON-able dict (record position, packing and
worker states, the skipped-record counters); ``set_state`` on a freshly built pipeline with
the same config resumes with exactly the batches the old one would have produced next.

With orbax, save the iterator next to the model state under one item name, e.g.::

    mngr = ocp.CheckpointManager(dir, item_names=("state", "data"))
    mngr.save(step, args=ocp.args.Composite(state=..., data=save_args(iterator)))
    mngr.restore(step, args=ocp.args.Composite(state=..., data=restore_args(iterator)))

(grain's handler writes one ``process_<i>-of-<n>.json`` per JAX process.)
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain


def state_to_bytes(iterator: grain.DatasetIterator) -> bytes:
    """The iterator state as UTF-8 JSON."""
    return json.dumps(iterator.get_state(), sort_keys=True).encode()


def restore_state(iterator: grain.DatasetIterator, data: bytes | str) -> None:
    """Restores a state written by ``state_to_bytes``."""
    iterator.set_state(json.loads(data))


def save_state_file(iterator: grain.DatasetIterator, path: str | os.PathLike) -> None:
    """Writes the state to ``path`` atomically."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(state_to_bytes(iterator))
    os.replace(tmp, path)


def load_state_file(iterator: grain.DatasetIterator, path: str | os.PathLike) -> None:
    """Restores the state saved by ``save_state_file``."""
    with open(path, "rb") as f:
        restore_state(iterator, f.read())


def save_args(iterator: grain.DatasetIterator) -> Any:
    """orbax ``CheckpointArgs`` saving ``iterator`` (grain's ``CheckpointHandler``)."""
    return grain.checkpoint.CheckpointSave(iterator)


def restore_args(iterator: grain.DatasetIterator) -> Any:
    """orbax ``CheckpointArgs`` restoring into ``iterator`` in place."""
    return grain.checkpoint.CheckpointRestore(iterator)
