"""What a run measured about itself, for metrics.json and the loss-curve title.

Real (non-padding) tokens are counted as the Trainer's `include_num_input_tokens_seen="non_padding"`
does, trained tokens (labels that are not -100, the loss's own count) beside them — both on the device,
summed over ranks when logged (TrainedTokenCountMixin). Peak memory is the GPU allocator's peak, or the
process's peak RSS on CPU; the memory plan's estimate is written beside it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import resource
import time

import torch
from transformers import TrainerCallback

from qlaunch.data.labels import IGNORE_INDEX

GiB = 1024**3


def packed_real_tokens(input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor,
                       pad_token_id: int) -> torch.Tensor:
    """Real tokens of packed rows, which carry no attention mask (qlaunch.data.collate): each row is its
    samples, then padding as one more run of restarting positions — pad ids with label -100 from the last
    position 0 to the end. Counting `input_ids != pad` (the Trainer's fallback) also drops every real EOS
    when pad == eos (Llama-3, Mistral); a real last sample never starts with a pad token, so it is kept."""
    length = input_ids.shape[-1]
    index = torch.arange(length, device=input_ids.device)
    last_start = torch.where(position_ids == 0, index, torch.zeros_like(index)).max(dim=-1).values
    in_tail = index >= last_start.unsqueeze(-1)
    padding = (input_ids == pad_token_id) & (labels == IGNORE_INDEX)
    tail_is_padding = (padding | ~in_tail).all(dim=-1) & (last_start > 0)
    return torch.where(tail_is_padding, last_start, torch.full_like(last_start, length)).sum()


def input_tokens(inputs, mode, pad_token_id) -> torch.Tensor | int:
    """The tokens of one micro-batch the Trainer's include_num_input_tokens_seen counts ("all": every
    position; "non_padding": the attention mask's, or input_ids != pad), as a device tensor; packed rows,
    which carry no mask, by their layout (packed_real_tokens)."""
    input_ids = inputs["input_ids"]
    if mode != "non_padding":
        return input_ids.numel()
    if "attention_mask" in inputs:
        return inputs["attention_mask"].sum()
    if pad_token_id is None:
        return input_ids.numel()
    if "position_ids" in inputs and "labels" in inputs:
        return packed_real_tokens(input_ids, inputs["labels"], inputs["position_ids"], pad_token_id)
    return (input_ids != pad_token_id).sum()


class TrainedTokenCountMixin:
    """Trainer mixin: count the real tokens (the Trainer's include_num_input_tokens_seen, packed rows by
    their layout) and the trained (labelled) target tokens of every micro-batch, all ranks — on the device.

    The Trainer gathers and reads its count back after every micro-batch (a blocking host-device sync each,
    which stalls a GPU that could run ahead). Here both counts accumulate on the device and are gathered in
    one collective when something reads them: a log (every rank logs together) and a checkpoint's state."""

    trained_tokens_seen = 0
    _qlaunch_pending: torch.Tensor | None = None  # [real, trained] since the last flush, on the device

    def _track_num_input_tokens(self, inputs):
        if not hasattr(inputs, "get") or "input_ids" not in inputs:
            return super()._track_num_input_tokens(inputs)
        mode = self.args.include_num_input_tokens_seen
        mode = "no" if mode in (False, None, "no") else ("all" if mode in (True, "all") else mode)
        real = input_tokens(inputs, mode, getattr(self.processing_class, "pad_token_id", None)) if mode != "no" else 0
        labels = inputs.get("labels")
        trained = (labels[..., 1:] != IGNORE_INDEX).sum() if labels is not None else 0
        counts = torch.stack([torch.as_tensor(real, dtype=torch.int64, device=self.args.device),
                              torch.as_tensor(trained, dtype=torch.int64, device=self.args.device)])
        self._qlaunch_pending = counts if self._qlaunch_pending is None else self._qlaunch_pending + counts

    def flush_token_counts(self) -> None:
        """Add the counts of every rank since the last flush to the totals (collective: all ranks call it)."""
        pending = self._qlaunch_pending
        if pending is None:
            pending = torch.zeros(2, dtype=torch.int64, device=self.args.device)
        real, trained = self.accelerator.gather(pending.unsqueeze(0)).reshape(-1, 2).sum(dim=0).tolist()
        self._qlaunch_pending = None
        self.state.num_input_tokens_seen += int(real)
        self.trained_tokens_seen += int(trained)

    def log(self, logs, *args, **kwargs):
        self.flush_token_counts()
        return super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        self.flush_token_counts()  # trainer_state.json holds the count a resumed run continues from
        return super()._save_checkpoint(model, trial)


def process_age_seconds() -> float | None:
    """Seconds since this process started (Linux: /proc, 10 ms resolution); None elsewhere."""
    import os

    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, after the command name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class DeviceGradNormMixin:
    """Trainer mixin: under DeepSpeed the gradient norm stays a tensor until a log reads it.

    DeepSpeed clips inside its own step; the Trainer then asks accelerate for the norm, whose DeepSpeed
    wrapper reads it back with `.item()` — and the Trainer's `_get_grad_norm` would again: a blocking
    host-device sync after every optimizer step. Without DeepSpeed the Trainer keeps clip_grad_norm_'s
    tensor and reads it only when logging. The norm is used nowhere else in between, so DeepSpeed runs
    take the engine's own value (a tensor) the same way (the log converts tensors itself)."""

    def _deepspeed_engine(self):
        wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        return None if wrapped is None else wrapped.engine

    def _clip_grad_norm(self, model):
        engine = self._deepspeed_engine()
        return super()._clip_grad_norm(model) if engine is None else engine.get_global_grad_norm()

    def _get_grad_norm(self, model, grad_norm=None):
        engine = self._deepspeed_engine()
        if engine is None:
            return super()._get_grad_norm(model, grad_norm)
        return engine.get_global_grad_norm() if grad_norm is None else grad_norm


class RunClock(TrainerCallback):
    """Wall time of training (this session: a resumed run counts from its restart), and startup: each rank's
    time from its process start to its first training step, gathered once on that step (one small collective:
    the ranks are entering the step together anyway). A rank much slower than the others to start is what
    holds a large job at its first collective."""

    def __init__(self):
        self.start = time.monotonic()
        self.seconds = 0.0
        self.startup_seconds: list[float] | None = None  # per rank, rank order

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.startup_seconds is None:
            self.startup_seconds = gather_floats(process_age_seconds() or 0.0)
            if state.is_world_process_zero:
                ranks = self.startup_seconds
                spread = (f" (ranks: fastest {min(ranks):.1f} s, slowest {max(ranks):.1f} s, rank "
                          f"{ranks.index(max(ranks))})") if len(ranks) > 1 else ""
                logging.getLogger("qlaunch").info("First training step %.1f s after the process started%s.",
                                                  ranks[0], spread)

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.monotonic() - self.start


def gather_floats(value: float) -> list[float]:
    """Every rank's value, in rank order, on every rank (the value itself in one process). On the CPU
    through the process group's object gather: a float, not a device tensor."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return [float(v) for v in values]


def peak_memory_bytes(cuda: bool) -> int:
    if cuda:
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def config_hash(config) -> str:
    """A short hash of the effective (non-default) settings: equal runs, equal hash."""
    effective = {"quant_method": config.quant_method, "compute_dtype": str(config.compute_dtype),
                 **{k: v for k, v in config.non_default().items() if k not in ("output_dir", "logging_dir")}}
    return hashlib.sha256(json.dumps(effective, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_metrics(config, trainer, clock: RunClock) -> dict:
    from qlaunch.memory.planner import memory_plan

    seconds = clock.seconds or (time.monotonic() - clock.start)
    real = int(trainer.state.num_input_tokens_seen or 0)
    trained = int(getattr(trainer, "trained_tokens_seen", 0))
    cuda = trainer.args.device.type == "cuda"
    peak = peak_memory_bytes(cuda)
    out = {
        "real_tokens_seen": real,
        "trained_tokens_seen": trained,
        "real_tokens_per_second": real / seconds if seconds else None,
        "trained_tokens_per_second": trained / seconds if seconds else None,
        "wall_time_seconds": seconds,
        "startup_seconds_per_rank": clock.startup_seconds,
        "peak_memory_gib": peak / GiB,
        "peak_memory_kind": "cuda max_memory_allocated" if cuda else "process peak RSS",
        "config_hash": config_hash(config),
    }
    try:
        out["plan_estimate_gib"] = memory_plan(config)["total_gib_estimate"]
    except Exception as e:  # the plan is informative here; never fail a finished run over it
        out["plan_estimate_gib"] = None
        out["plan_error"] = str(e)
    return out
