"""Out of GPU memory: one message with this run's memory plan and the changes that would fit.

Caught at the top level of finetune.py (exit code 3) instead of a CUDA traceback as the only
output. The options come from re-planning the same run with one setting changed, not from rules
of thumb; `python -m qlaunch.plan`'s fit verdict uses the same re-planning.
"""
from __future__ import annotations

import copy
import dataclasses

GiB = 1024**3
EXIT_CODE = 3
MIN_LENGTH = 256


def _value(x):
    return getattr(x, "value", x)


def candidate_changes(args) -> list[tuple[str, dict]]:
    """One-setting changes that lower memory, as (flag text, flag overrides)."""
    changes = []
    batch, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    if batch > 1:
        for smaller in sorted({batch // 2, 1}, reverse=True):
            changes.append((f"--per_device_train_batch_size {smaller} --gradient_accumulation_steps "
                            f"{accumulation * batch // smaller} (same global batch)",
                            {"per_device_train_batch_size": smaller,
                             "gradient_accumulation_steps": accumulation * batch // smaller}))
    if not (args.activation_checkpointing or getattr(args, "gradient_checkpointing", False)):
        changes.append(("--gradient_checkpointing", {"activation_checkpointing": True}))
    length = args.model_max_length // 2
    while length >= MIN_LENGTH:
        changes.append((f"--model_max_length {length}", {"model_max_length": length}))
        length //= 2
    if "8bit" not in str(_value(args.optim)):
        changes.append(("--optim paged_adamw_8bit", {"optim": "paged_adamw_8bit"}))
    if getattr(args, "attn_implementation", None) == "eager":
        changes.append(("--attn_implementation sdpa", {"attn_implementation": "sdpa"}))
    if not args.q_lora:
        changes.append(("--q_lora (NF4 base)", {"q_lora": True, "use_lora": True, "quantization": "nf4"}))
    return changes


def replanned_args(args, overrides: dict):
    changed = copy.copy(args)
    for key, value in overrides.items():
        setattr(changed, key, value)
    return changed


def replanned_settings(settings, overrides: dict):
    if not overrides.get("q_lora") or settings.quant_method:
        return settings
    changed = copy.copy(settings)
    changed.quant_method = "nf4"
    changed.load_dtype = None
    return changed


def replan_all(args, settings, target, shape, stats) -> list[tuple[str, float]]:
    """(flag text, per-device peak GB) of every candidate change, re-planned."""
    from qlaunch.plan import compute

    out = []
    for text, overrides in candidate_changes(args):
        plan = compute(replanned_args(args, overrides), replanned_settings(settings, overrides), target, shape, stats)
        out.append((text, plan["memory_gb"]["per_device_peak"]))
    return out


def mildest_of_each_kind(replans: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """The first change of each kind (its first flag): candidate_changes lists the mildest first."""
    first: dict[str, tuple[str, float]] = {}
    for text, gb in replans:
        first.setdefault(text.split()[0], (text, gb))
    return list(first.values())


def options_that_fit(args, settings, target, shape, stats) -> list[tuple[str, float]]:
    """The re-planned changes that fit the target's memory: the mildest change of each kind
    (the longest --model_max_length, the largest batch), at most four."""
    limit = (target.memory_bytes or 0) / GiB
    fitting = mildest_of_each_kind([(text, gb) for text, gb in replan_all(args, settings, target, shape, stats)
                                    if gb <= limit])
    return sorted(fitting, key=lambda x: -x[1])[:4]


def oom_report(config, error: BaseException, device_bytes: int | None) -> str:
    """The message for an out-of-memory error of this run on a device of device_bytes (None: unknown)."""
    from qlaunch.plan import compute, detected_target, flat_args, format_plan
    from qlaunch.shape import model_shape, read_config

    target = detected_target()
    if device_bytes:
        target = dataclasses.replace(target, memory_bytes=device_bytes)
    args = flat_args(config)
    shape = model_shape(read_config(args.model_name_or_path))  # once, for the plan and every re-plan
    plan = compute(args, config.settings, target, shape, None)
    lines = [f"finetune.py: error: out of GPU memory ({str(error).splitlines()[0][:160]})", format_plan(plan)]
    if device_bytes:
        lines.append(f"Device memory: {device_bytes / GiB:.1f} GB.")
    replans = replan_all(args, config.settings, target, shape, None)
    if device_bytes:  # the mildest change of each kind that fits
        replans = [(text, gb) for text, gb in replans if gb * GiB < 0.95 * device_bytes] or replans
    options = sorted((gb, text) for text, gb in mildest_of_each_kind(replans))
    if options:
        lines.append("Options, re-planned (estimate per process):")
        lines += [f"  {text}: {gb:.2f} GB" for gb, text in options[:2]]
    lines.append("Or a larger GPU, more GPUs with ZeRO-2/3 (launch/qlora_ds.sh), or --q_lora on a full-precision base.")
    return "\n".join(lines)


def device_memory() -> int | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return None
