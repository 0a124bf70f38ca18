"""Trainer callbacks: preemption signals and a non-finite loss guard."""
from __future__ import annotations

import logging
import math
import signal
import time

from transformers import TrainerCallback

from qlaunch.cluster.preemption import PreemptionSignals, lead_too_short, stop_mid_step

log = logging.getLogger("qlaunch")


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on any rank (one tiny all-reduce; a no-op in one process)."""
    return any_ranks([flag])[0]


def control_group_backend(default_backend: str) -> str | None:
    """The backend of the group the ranks' control flags travel on (preemption, failed checks): None — the
    default group — when it carries CPU tensors (gloo, MPI, or a "cpu:gloo,cuda:nccl" pair); else "gloo",
    a CPU group of the same ranks. NCCL carries only device tensors, and reading its result back blocks
    the host until the GPU has finished everything queued before it: one stall in every training step.
    A gloo result is in host memory when the call returns."""
    backends = str(default_backend).lower()
    return None if any(b in backends for b in ("gloo", "mpi", "cpu:")) else "gloo"


# The CPU group of each default group, created on the ranks' first agreement (which every rank reaches
# together: new_group is collective). Keyed by the default group's id: one per process in practice.
_CONTROL_GROUPS: dict[int, object] = {}


def control_group(default_backend: str):
    """The process group for control flags (control_group_backend): None for the default group."""
    import torch.distributed as dist

    backend = control_group_backend(default_backend)
    if backend is None:
        return None
    key = id(dist.group.WORLD)
    if key not in _CONTROL_GROUPS:
        _CONTROL_GROUPS[key] = dist.new_group(backend=backend)
    return _CONTROL_GROUPS[key]


def any_ranks(flags: list[bool], backend: str | None = None) -> list[bool]:
    """Each flag True on every rank when it is True on any rank: one all-reduce of a CPU tensor for all of
    them, on a CPU process group (control_group), so agreeing never waits for the GPU. backend: the default
    group's (None: asked from torch.distributed)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(flags)
    value = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32)
    group = control_group(backend or dist.get_backend())
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in value.tolist()]


def rng_snapshot() -> dict:
    """The random states the Trainer saves with a checkpoint (python, numpy, torch CPU and CUDA)."""
    import random

    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rng_restore(state: dict) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class PreemptionCallback(TrainerCallback):
    """On SIGUSR1 / SIGTERM (SLURM's --signal, preemption, scancel): save a checkpoint at the
    end of the current step and stop, so the job can be requeued and resumed.

    Signals reach ranks (and nodes) milliseconds apart, and the checkpoint save is collective:
    a rank that stopped alone would wait in the save while the others wait in the next step's
    all-reduce, until the collective timeout. So ranks agree at every step end: all stop at the
    first step end where any rank has been signalled.

    When the warning's lead (QLAUNCH_SIGNAL_LEAD) is shorter than a measured optimizer step plus a
    save — a 70B recipe accumulating 16 micro-batches takes minutes per step — waiting for the step
    end would get the save killed half-written. Then the ranks also agree at every micro-step, and stop
    at the first one where finishing the step and saving would not fit in the time left: the step's
    partial accumulation is dropped, and the random state is put back to the step's start, so the
    checkpoint of the last finished step resumes exactly as if the run had stopped there.
    """

    def __init__(self, signals: PreemptionSignals | None = None, lead: float | None = None):
        # the record started by finetune.py (SIGUSR1 from its first line); SIGTERM joins it from here on
        self.signals = (signals or PreemptionSignals()).listen((signal.SIGUSR1, signal.SIGTERM))
        self.lead = lead
        self.stopped_at_step: int | None = None
        self.mid_step: tuple[int, int] | None = None  # (micro-steps done, of) when stopped inside a step
        self.step_seconds = self.micro_seconds = self.save_seconds = 0.0
        self.micro_checks = False  # agreed by every rank: the lead is shorter than a step + a save
        self._step_start = self._mark = self._step_end = 0.0
        self._micro_done = 0
        self._rng = None

    @property
    def received(self) -> str | None:
        """The signal this rank received."""
        return self.signals.received

    @property
    def stopped(self) -> bool:
        return self.stopped_at_step is not None

    def reason(self) -> str:
        return self.received or "a signal to another rank"

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = self._mark = time.monotonic()
        self._micro_done = 0
        if self.lead is not None and args.gradient_accumulation_steps > 1:
            self._rng = rng_snapshot()  # the state a checkpoint of the previous step would have saved
        return control

    def on_substep_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        self.micro_seconds = max(self.micro_seconds, now - self._mark)
        self._mark = now
        self._micro_done += 1
        if not self.micro_checks or self.stopped:
            return control
        stop = self.received is not None and stop_mid_step(
            self.lead - (now - self.signals.received_at), args.gradient_accumulation_steps - self._micro_done,
            self.micro_seconds, self.save_seconds)
        if any_rank(stop):
            rng_restore(self._rng)
            self.stopped_at_step = state.global_step
            self.mid_step = (self._micro_done, args.gradient_accumulation_steps)
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self._step_end = now = time.monotonic()
        self.step_seconds = max(self.step_seconds, now - self._step_start)
        too_short = lead_too_short(self.lead, self.step_seconds, self.save_seconds) if self.lead is not None else None
        signalled, long_steps = any_ranks([self.received is not None, too_short is not None])
        if long_steps and not self.micro_checks:  # agreed: from here on every rank checks at every micro-step
            self.micro_checks = True
            if state.is_world_process_zero and too_short:
                log.warning(too_short)
        if self.stopped_at_step is None and signalled:
            self.stopped_at_step = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.save_seconds = max(self.save_seconds, time.monotonic() - self._step_end)
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
    was logged, computed before it, is still finite): a checkpoint is never written with non-finite weights.
    The weights are checked at logging and saving steps (one host sync each, not one per step) and once more
    at the end of training, before the final save."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.bad_step is None and model is not None and (control.should_save or control.should_log):
            if any_rank(not trainables_finite(model)):
                self.bad_step, self.bad_value, self.what = state.global_step, float("nan"), "weights"
                control.should_save = False
                control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # the last steps may have logged nothing: the weights are checked once more before the final save
        if self.bad_step is None and model is not None and any_rank(not trainables_finite(model)):
            self.bad_step, self.bad_value, self.what = state.global_step, float("nan"), "weights"
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
