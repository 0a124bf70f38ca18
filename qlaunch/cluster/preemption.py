"""Preemption signals, recorded from the first line of finetune.py.

SLURM warns a job before its time limit with SIGUSR1 (--signal=USR1@120); the batch scripts make
torchrun ignore it, and an ignored signal stays ignored in the workers torchrun starts until they set
a handler. Set only once the model is loaded (minutes for a 70B), the warning would be dropped while
the workers tokenize and load. So the handler is installed first and only records; the training
callback (qlaunch.train.callbacks.PreemptionCallback) and the checks before training read the record.
SIGTERM keeps its default (the process ends) until training starts: torchrun sends it to the
survivors when a worker fails, and they must not linger in a load that nobody will use.
"""
from __future__ import annotations

import logging
import signal

log = logging.getLogger("qlaunch")


class PreemptionSignals:
    """Which preemption signal this process received, if any."""

    def __init__(self):
        self.received: str | None = None

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
            log.warning("%s received: will checkpoint and stop at the next step end (or before training starts).",
                        self.received)
