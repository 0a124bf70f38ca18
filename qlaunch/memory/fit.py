"""Does the plan fit: the verdict, the one-setting changes that would fit, and the out-of-memory message.

The options come from re-planning the same run with one setting changed, not from rules of thumb;
`python -m qlaunch.plan`'s verdict, finetune.py --dry_run and the OOM message (caught at the top
level of finetune.py, exit code 3, instead of a CUDA traceback as the only output) all use them.
"""
from __future__ import annotations

import copy
import dataclasses

from qlaunch.config.checkpoint import read_config
from qlaunch.memory.planner import GiB, Target, compute, dataset_stats, detected_target, flat_args, format_plan
from qlaunch.memory.shape import model_shape

EXIT_CODE = 3
MIN_LENGTH = 256
# A plan is said to fit when its peak is within this share of the device: allocator fragmentation and
# what the model does not count (kernels' workspaces) take the rest. The verdict, its options, the
# engine chooser and the out-of-memory advice all use it.
HEADROOM = 0.95


def _value(x):
    return getattr(x, "value", x)


# Engines that shard across GPUs, as re-planning overrides (the configs' content that matters).
ENGINES = (
    ("--deepspeed ds_configs/zero3.json", {"deepspeed": {"zero_optimization": {"stage": 3}}, "fsdp_config": None}),
    ("--fsdp_config fsdp_configs/fsdp2.json", {"fsdp_config": {"version": 2}, "deepspeed": None}),
    ("--fsdp_config fsdp_configs/fsdp2_offload.json",
     {"fsdp_config": {"version": 2, "cpu_offload": True}, "deepspeed": None}),
)


# What --engine auto chooses from, cheapest first (what each costs beyond memory): DDP replicates the
# model and only all-reduces gradients; ZeRO-2 also partitions gradients and optimizer state; ZeRO-3 and
# FSDP2 gather every block in every forward and backward (ZeRO-3 first: it keeps the non-quantized weights
# in the compute dtype where FSDP2 keeps fp32); offload adds host<->device copies every step. One process
# has no engine to shard with, only ZeRO-3's offload to the host.
AUTO_ENGINES = (
    ("DDP", "", {"deepspeed": None, "fsdp_config": None}),
    ("ZeRO-2", "--deepspeed ds_configs/zero2.json", {"deepspeed": {"zero_optimization": {"stage": 2}},
                                                     "fsdp_config": None}),
    ("ZeRO-3", *ENGINES[0]),
    ("FSDP2", *ENGINES[1]),
    ("ZeRO-3 + offload", "--deepspeed ds_configs/zero3_offload.json",
     {"deepspeed": {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                          "offload_param": {"device": "cpu"}}}, "fsdp_config": None}),
    ("FSDP2 + CPU offload", *ENGINES[2]),
)
ONE_PROCESS_ENGINES = ("DDP", "ZeRO-3 + offload")


def engine_choices(args, settings, target, shape, stats) -> list[dict]:
    """Every engine --engine auto may choose for this world size, cheapest first, re-planned: label, the
    flag that selects it, the per-device peak and whether it fits (None: no device limit known)."""
    limit = target.memory_bytes / GiB * HEADROOM if target.memory_bytes else None
    out = []
    for label, flag, overrides in AUTO_ENGINES:
        if target.world_size == 1 and label not in ONE_PROCESS_ENGINES:
            continue
        plan = compute(replanned_args(args, overrides), settings, target, shape, stats)
        peak = plan["memory_gb"]["per_device_peak"]
        out.append({"engine": label if target.world_size > 1 or label != "DDP" else "one process", "flag": flag,
                    "per_device_peak": peak, "fits": None if limit is None else peak <= limit})
    return out


def cheapest_engine(choices: list[dict]) -> dict | None:
    """The first engine that fits; without a device limit (CPU) the cheapest; None when none fits."""
    return next((c for c in choices if c["fits"] is not False), None)


def choose_engine(args, settings, target, stats) -> tuple[dict | None, list[dict], object]:
    """(the cheapest engine that fits, every engine tried, args re-planned with the choice — or args as
    they are when none fits)."""
    shape = model_shape(read_config(args.model_name_or_path))
    choices = engine_choices(args, settings, target, shape, stats)
    choice = cheapest_engine(choices)
    if choice is None:
        return None, choices, args
    overrides = next(o for label, flag, o in AUTO_ENGINES if flag == choice["flag"])
    return choice, choices, replanned_args(args, overrides)


def engine_choice_text(choice: dict | None, choices: list[dict], target) -> str:
    where = f"{target.world_size}x {target.name or 'device'}"
    tried = ", ".join(f"{c['engine']} {c['per_device_peak']:.1f} GB" for c in choices)
    if choice is None:
        return f"--engine auto: no engine fits {where} (per device: {tried}); more GPUs, a larger GPU or a smaller job"
    if choice["fits"] is None:
        return f"--engine auto: {choice['engine']} (no device memory limit known here: the cheapest engine)"
    cheaper = ", ".join(f"{c['engine']} needs {c['per_device_peak']:.1f}" for c in choices[:choices.index(choice)])
    why = f" ({cheaper})" if cheaper else ""
    return (f"--engine auto: {choice['engine']}{' ' + choice['flag'] if choice['flag'] else ''}, "
            f"{choice['per_device_peak']:.1f} GB per device on {where}; the cheapest that fits{why}")


def candidate_changes(args, world_size: int = 1, quant_method: str | None = None) -> list[tuple[str, dict]]:
    """One-setting changes that lower memory, as (flag text, flag overrides). With several GPUs, the
    sharding engines too."""
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
    if world_size > 1:
        from qlaunch.config.engine import engine_of

        current = engine_of(getattr(args, "deepspeed", None), getattr(args, "fsdp_config", None))
        for text, overrides in ENGINES:
            if engine_of(overrides["deepspeed"], overrides["fsdp_config"]) != current:
                changes.append((text, overrides))
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

    out = []
    for text, overrides in candidate_changes(args, target.world_size, settings.quant_method):
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
    limit = (target.memory_bytes or 0) / GiB * HEADROOM
    fitting = mildest_of_each_kind([(text, gb) for text, gb in replan_all(args, settings, target, shape, stats)
                                    if gb <= limit])
    return sorted(fitting, key=lambda x: -x[1])[:4]


def oom_report(config, error: BaseException, device_bytes: int | None) -> str:
    """The message for an out-of-memory error of this run on a device of device_bytes (None: unknown)."""

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
        replans = [(text, gb) for text, gb in replans if gb * GiB <= HEADROOM * device_bytes] or replans
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


def fit_verdict(plan: dict, options: list[tuple[str, float]] | None = None) -> dict:
    memory = plan["device"]["memory_gb"]
    peak = plan["memory_gb"]["per_device_peak"]
    if memory is None:
        return {"fits": None, "text": f"peak {peak:.1f} GB of live memory per process (CPU: no device limit "
                "planned; glibc keeps freed memory, so peak RSS can be higher unless MALLOC_MMAP_THRESHOLD_=131072)"}
    where = f"{plan['world_size']}x {plan['device']['name']}"
    if peak <= memory * HEADROOM:
        return {"fits": True, "spare_gb": memory - peak,
                "text": f"fits on {where} with {memory - peak:.1f} GB to spare ({peak:.1f} of {memory:.1f} GB)"}
    fitting = [(text, gb) for text, gb in (options or []) if gb <= memory * HEADROOM]
    text = (f"does not fit: {peak:.1f} GB > {memory:.1f} GB" if peak > memory else
            f"does not fit: {peak:.1f} GB leaves less than {100 - HEADROOM * 100:.0f}% of {memory:.1f} GB "
            "for what the plan does not count (allocator fragmentation, kernel workspaces)")
    load_limited = plan["memory_gb"]["peak_phase"] == "load" and plan["quantization"] in ("nf4", "fp4", "gptq")
    if load_limited:
        text += (f"; loading is the limit: the 4-bit base is placed whole on every GPU "
                 f"({plan['memory_gb']['load_peak']:.1f} GB) before the engine shards it")
    if fitting:
        text += "; options that fit: " + ", ".join(f"{t} ({gb:.1f} GB)" for t, gb in fitting)
    elif options is not None and load_limited:
        text += ("; more GPUs with --fsdp_config fsdp_configs/fsdp2.json or --deepspeed ds_configs/zero3.json (both "
                 "build the 4-bit base in host memory and move only each GPU's shard there), or a GPU with more memory")
    elif options is not None:
        text += "; no one-flag change fits: more GPUs with ZeRO-3 (--deepspeed ds_configs/zero3.json --num_gpus N) or a larger GPU"
    return {"fits": False, "over_gb": peak - memory, "text": text,
            "options": [{"change": t, "per_device_peak": gb} for t, gb in fitting]}


def plan_text(config, dataset=None) -> str:
    """What --dry_run prints: the plan for this machine, with the verdict when it has a GPU."""

    target = detected_target()
    stats = dataset_stats(dataset) if dataset is not None else None
    return format_plan(planned(flat_args(config), config.settings, target, stats, options_that_fit))


def planned(args, settings, target: Target, stats, options_fn=None) -> dict:

    shape = model_shape(read_config(args.model_name_or_path))
    plan = compute(args, settings, target, shape, stats)
    options = None
    over = target.memory_bytes and plan["memory_gb"]["per_device_peak"] * GiB > target.memory_bytes * HEADROOM
    if over and options_fn:
        options = options_fn(args, settings, target, shape, stats)
    plan["fit"] = fit_verdict(plan, options)
    return plan
