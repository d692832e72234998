"""Multi-host start-up: ``jax.distributed.initialize`` before anything touches a device.

Three ways, first match wins:

1. explicit settings -- CLI flags ``--coordinator HOST:PORT --num-processes N --process-id I``
   or the environment ``BASQUE_JAX_COORDINATOR`` / ``BASQUE_JAX_NUM_PROCESSES`` /
   ``BASQUE_JAX_PROCESS_ID`` (any machines; on CPU the gloo collectives are switched on);
2. a Cloud TPU VM (TPU chips on the PCI bus, or the TPU worker environment variables that GKE
   and queued resources set): ``jax.distributed.initialize()`` with no arguments, which reads
   the slice's workers and this worker's id from the TPU metadata (a one-host slice becomes a
   one-process group);
3. otherwise nothing (one process). ``BASQUE_JAX_DISTRIBUTED=auto`` forces JAX's own cluster
   detection (SLURM, Open MPI, Kubernetes); ``BASQUE_JAX_DISTRIBUTED=off`` disables 2 and 3.
"""

from __future__ import annotations

import argparse
import glob
import os
from collections.abc import Mapping
from dataclasses import dataclass

from basque_jax.errors import ConfigError

ENV_COORDINATOR = "BASQUE_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "BASQUE_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "BASQUE_JAX_PROCESS_ID"
ENV_MODE = "BASQUE_JAX_DISTRIBUTED"
ENV_TIMEOUT = "BASQUE_JAX_INIT_TIMEOUT"
TPU_ENV_HINTS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")
GOOGLE_PCI_VENDOR = "0x1ae0"


@dataclass(frozen=True)
class Explicit:
    """Coordinator address and this process's place in the group."""

    coordinator: str
    num_processes: int
    process_id: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--coordinator/--num-processes/--process-id`` flags of a sub-command."""
    group = parser.add_argument_group(
        "multi-host", f"explicit jax.distributed settings (else ${ENV_COORDINATOR} etc.; "
        "automatic on Cloud TPU VMs)")
    group.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator service")
    group.add_argument("--num-processes", type=int, help="number of processes in the group")
    group.add_argument("--process-id", type=int, help="this process's id in [0, N)")


def explicit_settings(args: argparse.Namespace | None = None,
                      environ: Mapping[str, str] = os.environ) -> Explicit | None:
    """Settings from flags (preferred) or the environment; None when none are given.

    A partial set is a ``ValueError`` naming what is missing.
    """
    values = {
        "coordinator": getattr(args, "coordinator", None) or environ.get(ENV_COORDINATOR),
        "num_processes": _int(getattr(args, "num_processes", None),
                              environ.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES),
        "process_id": _int(getattr(args, "process_id", None), environ.get(ENV_PROCESS_ID),
                           ENV_PROCESS_ID),
    }
    given = {k for k, v in values.items() if v not in (None, "")}
    if not given:
        return None
    if given != set(values):
        missing = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(set(values) - given))
        raise ConfigError(f"multi-host settings are incomplete: also give {missing} (or the "
                         f"{ENV_COORDINATOR} / {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID} variables)")
    s = Explicit(str(values["coordinator"]), int(values["num_processes"]),
                 int(values["process_id"]))
    if ":" not in s.coordinator:
        raise ConfigError(f"coordinator {s.coordinator!r}: expected HOST:PORT")
    if s.num_processes < 1 or not 0 <= s.process_id < s.num_processes:
        raise ConfigError(f"process id {s.process_id} is not in [0, {s.num_processes})")
    return s


def _int(flag: int | None, env: str | None, name: str) -> int | None:
    if flag is not None:
        return flag
    if env in (None, ""):
        return None
    try:
        return int(env)
    except ValueError:
        raise ConfigError(f"${name}: expected an integer, got {env!r}") from None


def on_cloud_tpu_vm(environ: Mapping[str, str] = os.environ, sysfs: str = "/sys/bus/pci") -> bool:
    """TPU chips on this machine's PCI bus, or a TPU worker environment."""
    if any(environ.get(k) for k in TPU_ENV_HINTS):
        return True
    for vendor in glob.glob(os.path.join(sysfs, "devices", "*", "vendor")):
        try:
            with open(vendor) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def plan(args: argparse.Namespace | None = None,
         environ: Mapping[str, str] = os.environ) -> Explicit | str | None:
    """What :func:`initialize` will do: ``Explicit`` settings, ``"auto"`` or None."""
    explicit = explicit_settings(args, environ)
    if explicit is not None:
        return explicit
    mode = environ.get(ENV_MODE, "").lower()
    if mode in ("off", "0", "false", "no"):
        return None
    if mode == "auto" or on_cloud_tpu_vm(environ):
        return "auto"
    return None


def initialize(args: argparse.Namespace | None = None,
               environ: Mapping[str, str] = os.environ) -> str:
    """Start ``jax.distributed`` as :func:`plan` says; returns a one-line description."""
    what = plan(args, environ)
    if what is None:
        return "single process"
    import jax

    timeout = int(environ.get(ENV_TIMEOUT, "300"))
    if what == "auto":
        jax.distributed.initialize(initialization_timeout=timeout)
    else:
        platforms = environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
        if platforms.split(",")[0] == "cpu":  # CPU devices need a collectives backend
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=what.coordinator,
                                   num_processes=what.num_processes,
                                   process_id=what.process_id,
                                   initialization_timeout=timeout)
    desc = (f"process {jax.process_index()} of {jax.process_count()}, "
            f"{jax.local_device_count()} local / {jax.device_count()} devices")
    print(f"[distributed] {desc}", flush=True)
    return desc


def all_processes_agree(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (one tiny collective; free on one process).
    Loops whose hosts may run out of data at different times ask it before each collective
    step, so that all stop together instead of hanging."""
    import jax

    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))))
