"""Cloud TPU slices by name: chips, physical shape and per-chip hardware numbers.

``parse_topology("v5p-32")`` → a :class:`Topology` with 16 chips laid out ``2x2x4`` (v4/v5p
accelerator types count TensorCores, two per chip; v5e/v6e types count chips). The explicit form
``"v5e:2x2"`` names the shape directly. Pure Python (no JAX), so configs can validate it cheaply.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Chip:
    """Per-chip numbers of one TPU generation (Google Cloud's published specifications)."""

    generation: str
    hbm_bytes: int
    peak_bf16_flops: float
    cores_per_chip: int  # TensorCores per chip (the accelerator-type suffix counts these)
    dims: int  # 2-D torus (v5e, v6e) or 3-D (v4, v5p)
    runtime_version: str  # the TPU VM software version to create slices with


GiB = 1024**3
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GiB, 275e12, 2, 3, "tpu-ubuntu2204-base"),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 1, 2, "v2-alpha-tpuv5-lite"),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2, 3, "v2-alpha-tpuv5"),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1, 2, "v2-alpha-tpuv6e"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}
# Dense bf16 peak FLOP/s and HBM bandwidth (bytes/s) of the GPUs people run the framework on
# (NVIDIA's data sheets; SXM unless named). The first key found in the device kind counts.
GPU_PEAK_BF16 = {"h100 pcie": 756e12, "h100 nvl": 835e12, "h100": 989e12, "h200": 989e12,
                 "a100": 312e12, "b200": 2250e12}
GPU_HBM_BANDWIDTH = {"h100 pcie": 2.0e12, "h100 nvl": 3.9e12, "h100": 3.35e12, "h200": 4.8e12,
                     "a100-sxm4-40gb": 1.555e12, "a100": 2.039e12, "b200": 8.0e12}

# Default physical shapes by chip count (what `gcloud ... --accelerator-type` slices use).
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
             128: (8, 16), 256: (16, 16)}
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
             2048: (8, 16, 16), 4096: (16, 16, 16)}


def chip_of_device_kind(kind: str) -> Chip | None:
    """The TPU generation of a ``jax.Device.device_kind`` ("TPU v4", "TPU v5 lite" = v5e,
    "TPU v5" / "TPU v5p" = v5p, "TPU v6 lite" / "TPU v6e" = v6e); None for other devices."""
    k = kind.lower()
    if "tpu" not in k:
        return None
    if "v6" in k:
        return CHIPS["v6e"]
    if "v5" in k:
        return CHIPS["v5e"] if ("lite" in k or "v5e" in k) else CHIPS["v5p"]
    if "v4" in k:
        return CHIPS["v4"]
    return None


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device of this kind (TPU chips and common GPUs)."""
    chip = chip_of_device_kind(device_kind)
    if chip is not None:
        return chip.peak_bf16_flops
    k = device_kind.lower()
    return next((v for key, v in GPU_PEAK_BF16.items() if key in k), None)


def hbm_bandwidth(device_kind: str) -> float | None:
    """HBM bandwidth (bytes/s) of one GPU of this kind (None for others), for rooflines."""
    k = device_kind.lower()
    return next((v for key, v in GPU_HBM_BANDWIDTH.items() if key in k), None)


def peak_flops_per_device() -> float | None:
    """:func:`peak_flops` of the local accelerator (None on CPU), for MFU."""
    import jax

    return peak_flops(jax.devices()[0].device_kind)


@dataclass(frozen=True)
class Topology:
    """One TPU slice: ``name`` as given, the chip, and the physical ``shape`` of its chips."""

    name: str
    chip: Chip
    shape: tuple[int, ...]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def topology_name(self) -> str:
        """The ``jax.experimental.topologies.get_topology_desc`` name, e.g. ``v5p:2x2x4``."""
        return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def accelerator_type(self) -> str:
        """The gcloud ``--accelerator-type`` of this slice (``v5litepod-8``, ``v5p-32``)."""
        prefix = {"v5e": "v5litepod"}.get(self.chip.generation, self.chip.generation)
        return f"{prefix}-{self.chips * self.chip.cores_per_chip}"


def parse_topology(name: str) -> Topology:
    """``v5e-8`` / ``v5litepod-8`` / ``v6e-8`` / ``v5p-32`` / ``v4-32`` / ``v5e:2x2``."""
    text = name.strip().lower()
    known = ", ".join(sorted(CHIPS))
    m = re.fullmatch(r"([a-z0-9]+?)[:-](\d+(?:x\d+)*)", text)
    if not m:
        raise ValueError(f"bad TPU topology {name!r}: expected e.g. v5e-8, v5p-32 or v5e:2x2")
    gen = ALIASES.get(m.group(1), m.group(1))
    if gen not in CHIPS:
        raise ValueError(f"unknown TPU generation {m.group(1)!r} in {name!r}; known: {known}")
    chip = CHIPS[gen]
    if "x" in m.group(2):
        shape = tuple(int(x) for x in m.group(2).split("x"))
        if len(shape) != chip.dims or min(shape) < 1:
            raise ValueError(f"{name!r}: {gen} slices have {chip.dims}-D shapes like "
                             f"{'x'.join(['2'] * chip.dims)}")
        return Topology(name, chip, shape)
    count = int(m.group(2))
    if count % chip.cores_per_chip:
        raise ValueError(f"{name!r}: {gen} accelerator types count TensorCores "
                         f"({chip.cores_per_chip} per chip), so the suffix must be even")
    chips = count // chip.cores_per_chip
    table = SHAPES_2D if chip.dims == 2 else SHAPES_3D
    if chips not in table:
        sizes = ", ".join(f"{gen}-{c * chip.cores_per_chip}" for c in table)
        raise ValueError(f"{name!r}: no standard {gen} slice with {chips} chips; known: {sizes} "
                         f"(or give the shape, e.g. {gen}:{'x'.join(['2'] * chip.dims)})")
    return Topology(name, chip, table[chips])
