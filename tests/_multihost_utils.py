"""Two ``basque-jax`` processes on localhost (jax.distributed, gloo collectives, 4 CPU devices
each): starting them and collecting their outputs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from _openai_stub import free_port

from basque_jax import distributed


def start_two(argv: Sequence[str], cache_dir: Path) -> list[subprocess.Popen]:
    """``basque-jax ARGV`` as processes 0 and 1 of 2 with 4 CPU devices each; ``cache_dir``:
    their shared persistent compilation cache (a relaunch reuses the first one's programs)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    for key in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
                distributed.ENV_PROCESS_ID):
        env.pop(key, None)
    port = free_port()
    return [subprocess.Popen(
        [sys.executable, "-m", "basque_jax.cli", *argv, "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", "2", "--process-id", str(i)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> tuple[list[str], list[int]]:
    """Outputs and exit codes; a process still running after ``timeout`` (a hang) fails."""
    outputs, codes = [], []
    deadline = time.time() + timeout
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a process hung (still running after {timeout:.0f} s)")
        outputs.append(out)
        codes.append(p.returncode)
    return outputs, codes
