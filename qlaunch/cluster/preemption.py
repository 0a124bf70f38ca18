"""Preemption signals, recorded from the first line of finetune.py.

SLURM warns a job before its time limit with SIGUSR1 (--signal=USR1@120); the batch scripts make
torchrun ignore it, and an ignored signal stays ignored in the workers torchrun starts until they set
a handler. Set only once the model is loaded (minutes for a 70B), the warning would be dropped while
the workers tokenize and load. So the handler is installed first and only records; the training
callback (qlaunch.train.callbacks.PreemptionCallback) and the checks before training read the record.
SIGTERM keeps its default (the process ends) until training starts: torchrun sends it to the
survivors when a worker fails, and they must not linger in a load that nobody will use.

A warning is acted on at the end of an optimizer step, unless the step is longer than the warning's
lead (QLAUNCH_SIGNAL_LEAD, set by the batch scripts): then the run stops at the next micro-step whose
step could not be finished and saved in time (qlaunch.train.callbacks.PreemptionCallback).
"""
from __future__ import annotations

import logging
import math
import signal
import time

from qlaunch.config.environment import LEAD_VARIABLE

log = logging.getLogger("qlaunch")


class PreemptionSignals:
    """Which preemption signal this process received, if any."""

    def __init__(self):
        self.received: str | None = None
        self.received_at: float | None = None  # time.monotonic() of the first signal

    @classmethod
    def install(cls, signals=(signal.SIGUSR1,)) -> PreemptionSignals:
        return cls().listen(signals)

    def listen(self, signals) -> PreemptionSignals:
        for sig in signals:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        first = self.received is None
        self.received = signal.Signals(signum).name
        if first:
            self.received_at = time.monotonic()
            log.warning("%s received: will checkpoint and stop at the next step end (or before training starts).",
                        self.received)


def lead_too_short(lead: float, step_seconds: float, save_seconds: float) -> str | None:
    """A warning when a preemption lead cannot cover one optimizer step plus a checkpoint save."""
    if lead >= step_seconds + save_seconds:
        return None
    need = math.ceil((step_seconds + save_seconds) * 1.5)
    return (f"The preemption warning comes {lead:.0f} s before the kill, but one optimizer step takes "
            f"{step_seconds:.0f} s and a checkpoint save {save_seconds:.0f} s: on a warning the run will stop at "
            f"the next micro-step and drop that step's partial accumulation. Ask for more lead "
            f"(#SBATCH --signal=USR1@{need} and {LEAD_VARIABLE}={need}) to lose less.")


def stop_mid_step(remaining: float, micro_steps_left: int, micro_seconds: float, save_seconds: float) -> bool:
    """Whether to stop at this micro-step (dropping the step's partial accumulation): the time left before
    the kill would not cover finishing the step and saving."""
    return remaining < micro_steps_left * micro_seconds + save_seconds
