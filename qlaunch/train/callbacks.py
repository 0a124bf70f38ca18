"""Trainer callbacks: preemption signals and a non-finite loss guard."""
from __future__ import annotations

import logging
import math
import signal

from transformers import TrainerCallback

from qlaunch.cluster.preemption import PreemptionSignals

log = logging.getLogger("qlaunch")


def any_rank(flag: bool, device) -> bool:
    """True on every rank when it is True on any rank (one tiny all-reduce; a no-op in one process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0], device=device)  # nccl needs it on the rank's GPU
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class PreemptionCallback(TrainerCallback):
    """On SIGUSR1 / SIGTERM (SLURM's --signal, preemption, scancel): save a checkpoint at the
    end of the current step and stop, so the job can be requeued and resumed.

    Signals reach ranks (and nodes) milliseconds apart, and the checkpoint save is collective:
    a rank that stopped alone would wait in the save while the others wait in the next step's
    all-reduce, until the collective timeout. So ranks agree at every step end: all stop at the
    first step end where any rank has been signalled.
    """

    def __init__(self, signals: PreemptionSignals | None = None):
        # the record started by finetune.py (SIGUSR1 from its first line); SIGTERM joins it from here on
        self.signals = (signals or PreemptionSignals()).listen((signal.SIGUSR1, signal.SIGTERM))
        self.stopped_at_step: int | None = None

    @property
    def received(self) -> str | None:
        """The signal this rank received."""
        return self.signals.received

    @property
    def stopped(self) -> bool:
        return self.stopped_at_step is not None

    def reason(self) -> str:
        return self.received or "a signal to another rank"

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at_step is None and any_rank(self.received is not None, args.device):
            self.stopped_at_step = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control


def _local(p):
    """The values this rank holds of a parameter: its ZeRO-3 partition or FSDP2 shard, else itself."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor
    return p._local_tensor if type(p).__name__ == "DTensor" else p


def trainables_finite(model) -> bool:
    """Whether every trainable value this rank holds is finite (one device sync)."""
    import torch

    checks = [torch.isfinite(_local(p)).all() for p in model.parameters() if p.requires_grad]
    return bool(torch.stack(checks).all()) if checks else True


class NonFiniteLossGuard(TrainerCallback):
    """Stop as soon as a logged loss is NaN or inf instead of training on garbage; and before any log or
    checkpoint, check the trainable weights themselves (an update can overflow them while the loss that
    was logged, computed before it, is still finite): a checkpoint is never written with non-finite weights."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.bad_step is None and model is not None and (control.should_save or control.should_log):
            if any_rank(not trainables_finite(model), args.device):
                self.bad_step, self.bad_value, self.what = state.global_step, float("nan"), "weights"
                control.should_save = False
                control.should_training_stop = True
        return control

    def __init__(self):
        self.bad_step: int | None = None
        self.bad_value: float | None = None
        self.what = "loss"

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Under fp16 the GradScaler skips steps whose gradients overflow (inf grad_norm is normal there).
        keys = ("loss",) if getattr(args, "fp16", False) else ("loss", "grad_norm")
        for key in keys:
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value) and self.bad_step is None:
                self.bad_step, self.bad_value, self.what = state.global_step, value, key
                control.should_training_stop = True
        return control

    def message(self) -> str:
        what = {"loss": "loss", "grad_norm": "gradient norm", "weights": "trainable weights"}[self.what]
        saved = " (no checkpoint was written with them)" if self.what == "weights" else ""
        return (
            f"training {what} became {self.bad_value} at step {self.bad_step}{saved}; stopped. The learning rate "
            "is the usual cause: lower --learning_rate, add --max_grad_norm 1.0, or use --bf16 True instead of "
            "--fp16 on GPUs that support it."
        )
