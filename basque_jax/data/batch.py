"""THE batch contract between the data pipeline and the trainer (the one place it is written).

Every batch the pipeline yields on a host is a ``dict`` of numpy arrays, all of shape
``[per_host_batch, seq_len]`` where ``per_host_batch = DataConfig.batch_size // process_count``:

===============  =========  ================================================================
key              dtype      meaning
===============  =========  ================================================================
``input_ids``    int32      token ids fed to the model (0 on padding)
``targets``      int32      the next token of the SAME document for every position: built per
                            document before packing as ``input = t[:-1]``, ``targets = t[1:]``
                            (0 on padding); never a token of a neighbouring document
``loss_mask``    float32    1.0 where the target is trained, 0.0 elsewhere: all targets of
                            corpus documents (BOS + text + ``<|end_of_text|>``); for
                            conversations only assistant content tokens and their
                            ``<|eot_id|>``; always 0.0 on padding
``positions``    int32      position within the document (segment), starting at 0 for each
                            segment; RoPE uses these
``segment_ids``  int32      1..n numbering the documents packed in a row, 0 on padding;
                            attention must stay within a segment (no attention across
                            documents, none to or from padding)
===============  =========  ================================================================

Loss: ``sum(loss_mask * xent(logits, targets)) / sum(loss_mask)`` summed over the global batch.
A corpus document longer than ``seq_len + 1`` tokens is split into windows whose positions
restart at 0. A final partial batch is dropped, or with ``drop_remainder: false`` padded with
rows that are all padding.

Multi-host: host ``i`` of ``n`` yields its own rows (disjoint data); ``make_global_batch``
turns them into ``jax.Array`` s of global shape ``[batch_size, seq_len]`` sharded over the
mesh's batch axes, with host ``i`` owning rows ``[i * per_host, (i + 1) * per_host)`` (for a
mesh whose batch axes follow process order, as ``jax.make_mesh`` builds them).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding

BATCH_KEYS: dict[str, np.dtype] = {
    "input_ids": np.dtype(np.int32),
    "targets": np.dtype(np.int32),
    "loss_mask": np.dtype(np.float32),
    "positions": np.dtype(np.int32),
    "segment_ids": np.dtype(np.int32),
}
def check_batch(batch: Mapping[str, np.ndarray], seq_len: int | None = None) -> None:
    """Raises ``ValueError`` if ``batch`` breaks the contract (keys, dtypes, shapes, padding)."""
    if set(batch) != set(BATCH_KEYS):
        raise ValueError(f"batch keys {sorted(batch)} != {sorted(BATCH_KEYS)}")
    shape = batch["input_ids"].shape
    for k, dtype in BATCH_KEYS.items():
        v = batch[k]
        if v.dtype != dtype or v.shape != shape or v.ndim != 2:
            raise ValueError(f"batch[{k!r}]: {v.dtype}{list(v.shape)}, expected {dtype}{shape}")
    if seq_len is not None and shape[1] != seq_len:
        raise ValueError(f"batch rows have length {shape[1]}, expected {seq_len}")
    pad = batch["segment_ids"] == 0
    if np.any(batch["loss_mask"][pad] != 0):
        raise ValueError("loss_mask is non-zero on padding")


def pad_batch(batch: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Pads a short final batch to ``rows`` rows of padding (all zeros: segment 0, no loss)."""
    n = len(batch["input_ids"])
    if n == rows:
        return dict(batch)
    return {k: np.pad(v, [(0, rows - n)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}


def make_global_batch(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding
                      ) -> dict[str, jax.Array]:
    """This host's numpy batch -> global ``jax.Array`` s laid out by ``sharding`` (from
    :func:`basque_jax.sharding.batch_sharding`: rows over the mesh axes the logical-axis table
    maps ``batch`` to). Every host calls this with its own rows
    (``jax.make_array_from_process_local_data``)."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }
