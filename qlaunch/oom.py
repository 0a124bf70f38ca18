"""Out of GPU memory: one message with this run's memory plan and the changes that would fit.

Caught at the top level of finetune.py (exit code 3) instead of a CUDA traceback as the only
output. The options come from re-planning the same run with one setting changed, not from rules
of thumb.
"""
from __future__ import annotations

import copy

GiB = 1024**3
EXIT_CODE = 3


def candidate_changes(targs) -> list[tuple[str, dict]]:
    """One-setting changes that lower memory, as (flag text, TrainingArguments overrides)."""
    changes = []
    batch, accumulation = targs.per_device_train_batch_size, targs.gradient_accumulation_steps
    if batch > 1:
        half = batch // 2
        changes.append((f"--per_device_train_batch_size {half} --gradient_accumulation_steps "
                        f"{accumulation * batch // half} (same global batch)",
                        {"per_device_train_batch_size": half, "gradient_accumulation_steps": accumulation * batch // half}))
    if not targs.activation_checkpointing:
        changes.append(("--gradient_checkpointing", {"activation_checkpointing": True}))
    if targs.model_max_length > 512:
        changes.append((f"--model_max_length {targs.model_max_length // 2}",
                        {"model_max_length": targs.model_max_length // 2}))
    if "8bit" not in str(getattr(targs.optim, "value", targs.optim)):
        changes.append(("--optim paged_adamw_8bit", {"optim": "paged_adamw_8bit"}))
    return changes


def replanned(config, overrides: dict) -> dict:
    from qlaunch.plan import memory_plan

    changed = copy.copy(config)
    changed.training = copy.copy(config.training)
    for key, value in overrides.items():
        setattr(changed.training, key, value)
    return memory_plan(changed)


def oom_report(config, error: BaseException, device_bytes: int | None) -> str:
    """The message for an out-of-memory error of this run on a device of device_bytes (None: unknown)."""
    from qlaunch.plan import format_plan, memory_plan

    plan = memory_plan(config)
    lines = [f"finetune.py: error: out of GPU memory ({str(error).splitlines()[0][:160]})",
             format_plan(plan)]
    if device_bytes:
        lines.append(f"Device memory: {device_bytes / GiB:.1f} GiB.")
    options = sorted(((replanned(config, overrides)["total_gib_estimate"], text)
                      for text, overrides in candidate_changes(config.training)))
    if device_bytes:
        fitting = [(gib, text) for gib, text in options if gib * GiB < 0.9 * device_bytes]
        options = fitting or options
    if options:
        lines.append("Options, re-planned (estimate per process):")
        lines += [f"  {text}: {gib:.2f} GiB" for gib, text in options[:2]]
    lines.append("Or a larger GPU, more GPUs with ZeRO-2/3 (launch/qlora_ds.sh), or --q_lora on a full-precision base.")
    return "\n".join(lines)


def device_memory() -> int | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return None
