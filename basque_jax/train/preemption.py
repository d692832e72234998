"""Preemption: Spot / preemptible TPU VMs get SIGTERM shortly before they go.

:class:`PreemptionWatch` answers, after every step, whether to save now and stop: on one
process after a SIGTERM; on several, at the step all processes agree on (JAX's preemption
sync point: any process's notice reaches all of them, and they pick the same next step). The
loop then saves a checkpoint and exits with :data:`PREEMPTED_EXIT` (75, ``EX_TEMPFAIL``), which
``tpu_setup/recover.sh`` treats as "resume".
"""

from __future__ import annotations

import signal
from types import FrameType

import jax

PREEMPTED_EXIT = 75


class Preempted(Exception):
    """The run saved a checkpoint and stopped because the machine is going away."""


class PreemptionWatch:
    """Catches SIGTERM (single process) or asks the preemption sync point (multi-process)."""

    def __init__(self) -> None:
        from jax._src import distributed

        self.multi = jax.process_count() > 1 and distributed.global_state.client is not None
        self.notified = False
        self._previous = None
        if not self.multi:  # multi-process: the JAX runtime's own SIGTERM notifier listens
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.notified = True

    def should_stop(self, step: int) -> bool:
        if self.multi:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.notified

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
