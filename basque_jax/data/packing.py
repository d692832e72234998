"""Packing: variable-length segments -> rows of exactly ``seq_len`` (the batch contract).

Uses grain's ``FirstFitPackIterDataset``: ``num_bins`` rows are filled first-fit, then emitted
(shuffled by a seeded RNG). Each row carries ``segment_ids`` (1..n per segment, 0 on padding)
and per-segment ``positions`` (0, 1, ... restarting at every segment); padding has
``loss_mask`` 0. Segments must already be at most ``seq_len`` long (see ``examples.py``).
"""

from __future__ import annotations

import grain
import numpy as np

PACKED_FIELDS = ("input_ids", "targets", "loss_mask")


def to_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """grain's packed element -> the contract's keys (see ``batch.py``)."""
    return {
        "input_ids": packed["input_ids"],
        "targets": packed["targets"],
        "loss_mask": packed["loss_mask"],
        "positions": packed["input_ids_positions"],
        "segment_ids": packed["input_ids_segment_ids"],
    }


def pack(
    ds: grain.IterDataset, seq_len: int, *, num_bins: int, seed: int = 0
) -> grain.IterDataset:
    """Packs an ``IterDataset`` of segments into rows of length ``seq_len``."""
    packed = grain.experimental.FirstFitPackIterDataset(
        ds,
        length_struct=dict.fromkeys(PACKED_FIELDS, seq_len),
        num_packing_bins=num_bins,
        seed=seed,
        shuffle_bins=True,
        # Packed and padded like input_ids, without their own segment ids / positions.
        meta_features=("targets", "loss_mask"),
    )
    return packed.map(to_row)
