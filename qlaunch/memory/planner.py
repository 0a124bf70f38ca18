"""`python -m qlaunch.plan`: the GPU memory a run will need, before launching it, from any machine.

The same flags as finetune.py (parsed by qlaunch.config, resolved by qlaunch.resolve with the
facts of the GPU planned for, so precision follows the training rules), plus:
  --gpu NAME | --gpu_memory_gb N --gpu_capability X.Y    the GPU (default: this machine)
  --num_gpus N --num_nodes N                             the world size (ZeRO partitions by it)
  --json                                                 one JSON object on stdout
Reads only config.json (as JSON: no remote code, no weights; a tokenizer only with --data_path).
The memory model is qlaunch.memory; the fit verdict's options come from re-planning (qlaunch.oom).
finetune.py --dry_run prints the same plan for the machine it runs on.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from types import SimpleNamespace

from qlaunch.errors import UsageError

GiB = 1024**3


@dataclass(frozen=True)
class Target:
    """Where the plan is for: the device facts and the world size."""

    machine: object  # qlaunch.machine.Machine
    memory_bytes: int | None = None  # per device; None: unknown (CPU)
    name: str | None = None
    num_gpus: int = 1
    num_nodes: int = 1

    @property
    def world_size(self) -> int:
        return self.num_gpus * self.num_nodes


def detected_target(env=os.environ) -> Target:
    from qlaunch.machine import Machine

    machine = Machine.detect()
    world = int(env.get("WORLD_SIZE", "1"))
    if not machine.cuda:
        return Target(machine, None, "CPU", num_gpus=world)
    import torch

    memory = torch.cuda.get_device_properties(0).total_memory
    return Target(machine, memory, machine.name, num_gpus=world)


def flat_args(config) -> SimpleNamespace:
    """A finetune.py Config as one namespace of flag values (what the parser produces)."""
    values = {}
    for part in (config.model, config.data, config.lora, config.training):
        values.update({k: getattr(part, k) for k in vars(part)})
    return SimpleNamespace(**values)


def _value(x):
    return getattr(x, "value", x)


def _bytes(dtype) -> int:
    import torch

    return torch.tensor([], dtype=dtype).element_size()


def token_stats(args, lengths: list[int] | None = None, trained: int | None = None) -> dict | None:
    """Length statistics of the training data (tokenized as training would), or None without data."""
    if lengths is None:
        if not getattr(args, "data_path", None):
            return None
        from qlaunch.data.dataset import build_dataset
        from qlaunch.model import load_tokenizer

        try:
            tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
        except Exception as e:  # a config-only directory: no tokenizer, no statistics
            return {"error": f"no tokenizer to count tokens with ({type(e).__name__}); planned at "
                             f"--model_max_length {args.model_max_length}"}
        return dataset_stats(build_dataset(args.data_path, tokenizer, max_length=args.model_max_length,
                                           system_message=args.system_message, truncation=args.truncation,
                                           lazy=False, show_progress=False))
    if not lengths:
        return None
    ordered = sorted(lengths)

    def pct(q):
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    stats = {"samples": len(lengths), "tokens": sum(lengths), "mean": sum(lengths) / len(lengths),
             "p50": pct(0.5), "p95": pct(0.95), "max": ordered[-1]}
    if trained is not None:
        stats["trained_tokens"] = trained
    return stats


def planned_seq_len(args, stats: dict | None) -> int:
    """Rows are padded to the longest sample of their batch: the peak comes with the longest one.
    Packed rows fill up to --model_max_length."""
    if args.packing or not stats or "max" not in stats:
        return int(args.model_max_length)
    return int(min(stats["max"], args.model_max_length))


def logits_fraction(args, stats: dict | None) -> float:
    """Share of positions that reach lm_head: with --labelled_logits_only (qlaunch/loss.py) the
    trained tokens of the data; without data, or with the flag off, every position (the safe side)."""
    if not getattr(args, "labelled_logits_only", False) or not stats or not stats.get("trained_tokens"):
        return 1.0
    return min(1.0, stats["trained_tokens"] / max(stats["tokens"], 1))


def build_job(args, settings, target: Target, seq_len: int, logits_share: float = 1.0):
    from qlaunch.memory import Job
    from qlaunch.resolve import offloads_optimizer, read_deepspeed_config, zero_stage

    ds = read_deepspeed_config(args.deepspeed) if getattr(args, "deepspeed", None) else {}
    offload_params = ((ds.get("zero_optimization") or {}).get("offload_param") or {}).get("device") in ("cpu", "nvme")
    return Job(
        quant=settings.quant_method,
        double_quant=bool(args.bnb_4bit_use_double_quant),
        compute_bytes=_bytes(settings.compute_dtype),
        base_bytes=_bytes(settings.base_dtype),
        use_lora=bool(args.use_lora or args.q_lora),
        lora_r=int(args.lora_r),
        lora_targets=tuple(args.lora_target_modules or ()),
        lora_dropout=float(args.lora_dropout),
        modules_to_save=tuple(args.lora_modules_to_save or ()),
        fp32_trainables=bool(settings.fp32_trainables),
        optim=str(_value(args.optim)),
        micro_batch=int(args.per_device_train_batch_size),
        seq_len=seq_len,
        logits_fraction=logits_share,
        checkpointing=bool(args.activation_checkpointing or getattr(args, "gradient_checkpointing", False)),
        attention=args.attn_implementation or "sdpa",
        zero_stage=zero_stage(ds),
        offload_optimizer=offloads_optimizer(ds),
        offload_params=offload_params,
        world_size=target.world_size,
        cuda=bool(target.machine.cuda),
    )


def compute(args, settings, target: Target, shape, stats: dict | None = None) -> dict:
    """The plan as a JSON-ready dict (no verdict options)."""
    from qlaunch.memory import plan_memory

    job = build_job(args, settings, target, planned_seq_len(args, stats), logits_fraction(args, stats))
    plan = plan_memory(shape, job)
    gb = {"per_device_peak": plan.peak_bytes / GiB, "peak_phase": plan.peak_phase,
          "persistent": {k: v / GiB for k, v in plan.persistent.items()},
          "peak_transient": {k: v / GiB for k, v in plan.transient.items()},
          "phases": {name: (sum(plan.persistent.values()) + sum(parts.values())) / GiB
                     for name, parts in plan.phases.items()}}
    precision = settings.precision
    out = {
        "model": args.model_name_or_path,
        "model_type": shape.model_type,
        "device": {"name": target.name, "memory_gb": target.memory_bytes / GiB if target.memory_bytes else None,
                   "capability": ".".join(map(str, target.machine.capability)) if target.machine.cuda else None},
        "world_size": target.world_size,
        "quantization": settings.quant_method,
        "precision": {"compute_dtype": str(settings.compute_dtype).replace("torch.", ""),
                      "fp16": bool(precision and precision.fp16), "bf16": bool(precision and precision.bf16)},
        "job": {k: v for k, v in vars(job).items()},
        **plan.counts,
        "memory_gb": gb,
        "tokens": stats,
        # older keys (metrics.json's plan_estimate_gib, the OOM message)
        "base_weights_gib": plan.persistent.get("base weights", 0) / GiB,
        "total_gib_estimate": plan.peak_bytes / GiB,
    }
    return out


def fit_verdict(plan: dict, options: list[tuple[str, float]] | None = None) -> dict:
    memory = plan["device"]["memory_gb"]
    peak = plan["memory_gb"]["per_device_peak"]
    if memory is None:
        return {"fits": None, "text": f"peak {peak:.1f} GB of live memory per process (CPU: no device limit "
                "planned; glibc keeps freed memory, so peak RSS can be higher unless MALLOC_MMAP_THRESHOLD_=131072)"}
    where = f"{plan['world_size']}x {plan['device']['name']}"
    if peak <= memory:
        return {"fits": True, "spare_gb": memory - peak,
                "text": f"fits on {where} with {memory - peak:.1f} GB to spare ({peak:.1f} of {memory:.1f} GB)"}
    fitting = [(text, gb) for text, gb in (options or []) if gb <= memory]
    text = f"does not fit: {peak:.1f} GB > {memory:.1f} GB"
    if fitting:
        text += "; options that fit: " + ", ".join(f"{t} ({gb:.1f} GB)" for t, gb in fitting)
    elif options is not None:
        text += "; no one-flag change fits: more GPUs with ZeRO-3 (--deepspeed ds_configs/zero3.json --num_gpus N) or a larger GPU"
    return {"fits": False, "over_gb": peak - memory, "text": text,
            "options": [{"change": t, "per_device_peak": gb} for t, gb in fitting]}


def format_plan(plan: dict) -> str:
    gb = plan["memory_gb"]
    device = plan["device"]
    where = (f"{plan['world_size']}x {device['name']} ({device['memory_gb']:.1f} GB, cc {device['capability']})"
             if device["memory_gb"] else f"{device['name']}, {plan['world_size']} process(es)")
    job = plan["job"]
    lines = [f"Memory plan: {plan['parameters']:,} parameters, {plan['trainable_parameters']:,} trainable — {where}",
             f"  {plan['quantization'] or 'full precision'} base, {plan['precision']['compute_dtype']} compute, "
             f"batch {job['micro_batch']} x {job['seq_len']} tokens, "
             f"{'activation checkpointing' if job['checkpointing'] else 'no checkpointing'}, {job['attention']}, "
             f"{job['optim']}" + (f", ZeRO-{job['zero_stage']}" if job["zero_stage"] else "")]
    if plan.get("tokens"):
        t = plan["tokens"]
        lines.append(f"  data: {t['error']}" if "error" in t else
                     f"  data: {t['samples']} samples, {t['tokens']:,} tokens, mean {t['mean']:.0f}, p95 {t['p95']}, "
                     f"max {t['max']} (the plan uses the longest)")
    lines.append("  held all step:")
    lines += [f"    {name:40} {v:8.2f} GB" for name, v in gb["persistent"].items() if v >= 0.005]
    lines.append(f"  at the peak ({gb['peak_phase']}):")
    lines += [f"    {name:40} {v:8.2f} GB" for name, v in gb["peak_transient"].items() if v >= 0.005]
    lines.append(f"  {'peak per device':42} {gb['per_device_peak']:8.2f} GB")
    if plan.get("fit"):
        lines.append(f"  verdict: {plan['fit']['text']}")
    return "\n".join(lines)


# ---- planning from finetune.py's own objects -------------------------------------------------


def memory_plan(config, target: Target | None = None, stats: dict | None = None) -> dict:
    """The plan of a parsed, resolved finetune.py Config (dry run, OOM report, metrics.json)."""
    from qlaunch.shape import model_shape, read_config

    target = target or detected_target()
    args = flat_args(config)
    shape = model_shape(read_config(args.model_name_or_path))
    return compute(args, config.settings, target, shape, stats)


def dataset_stats(dataset) -> dict | None:
    """token_stats of a built dataset, from what it already knows: its lengths (read from Arrow
    when cached, no row converted) and its tokenizing statistics' trained count. None when
    nothing was tokenized up front (--lazy_preprocess)."""
    samples = getattr(dataset, "samples", dataset)  # a PackedDataset wraps the tokenized samples
    if not hasattr(samples, "lengths"):
        return None
    return token_stats(None, samples.lengths, samples.stats.trained_tokens)


def plan_text(config, dataset=None) -> str:
    """What --dry_run prints: the plan for this machine, with the verdict when it has a GPU."""
    from qlaunch.oom import options_that_fit

    target = detected_target()
    stats = dataset_stats(dataset) if dataset is not None else None
    return format_plan(planned(flat_args(config), config.settings, target, stats, options_that_fit))


def planned(args, settings, target: Target, stats, options_fn=None) -> dict:
    from qlaunch.shape import model_shape, read_config

    shape = model_shape(read_config(args.model_name_or_path))
    plan = compute(args, settings, target, shape, stats)
    options = None
    if target.memory_bytes and plan["memory_gb"]["per_device_peak"] * GiB > target.memory_bytes and options_fn:
        options = options_fn(args, settings, target, shape, stats)
    plan["fit"] = fit_verdict(plan, options)
    return plan


# ---- the command line ------------------------------------------------------------------------

PLAN_ONLY_PREFIX = "--data_path is required"  # planning needs no data


def plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--gpu")
    p.add_argument("--gpu_memory_gb", type=float)
    p.add_argument("--gpu_capability")
    p.add_argument("--num_gpus", type=int, default=1)
    p.add_argument("--num_nodes", type=int, default=1)
    p.add_argument("--json", action="store_true")
    return p


def target_from(opts) -> Target:
    from qlaunch.gpus import custom_gpu, find_gpu, machine_for

    if opts.num_gpus < 1 or opts.num_nodes < 1:
        raise UsageError(f"--num_gpus {opts.num_gpus} --num_nodes {opts.num_nodes}: both must be at least 1.")
    if opts.gpu and (opts.gpu_memory_gb is not None or opts.gpu_capability):
        raise UsageError("--gpu NAME or --gpu_memory_gb N --gpu_capability X.Y: pass one of them.")
    if opts.gpu:
        device = find_gpu(opts.gpu)
    elif opts.gpu_memory_gb is not None or opts.gpu_capability:
        device = custom_gpu(opts.gpu_memory_gb, opts.gpu_capability)
    else:
        detected = detected_target({"WORLD_SIZE": "1"})
        return Target(detected.machine, detected.memory_bytes, detected.name, opts.num_gpus, opts.num_nodes)
    return Target(machine_for(device, opts.num_gpus), device.memory_bytes, device.name, opts.num_gpus,
                  opts.num_nodes)


def prepare_plan(argv: list[str]):
    """(args, settings, target, stats): finetune.py's parser and rules, for the target GPU."""
    from qlaunch.config import parse_namespace
    from qlaunch.model import require_library
    from qlaunch.resolve import resolve
    from qlaunch.validate import check_arguments

    opts, rest = plan_parser().parse_known_args(argv)
    target = target_from(opts)
    ns = parse_namespace(rest)
    ns.dry_run = True  # a config-only directory (no weights) is what planning needs
    problems = [p for p in check_arguments(ns) if not p.startswith(PLAN_ONLY_PREFIX)]
    settings = resolve(ns, target.machine, env={"WORLD_SIZE": str(target.world_size)})
    missing = require_library(settings.quant_method)  # planning does not load: libraries not needed here
    problems += [p for p in settings.problems if p != missing]
    if problems:
        raise UsageError(problems)
    for key, value in settings.overrides().items():  # what training would run with (q_lora → use_lora …)
        if hasattr(ns, key) and key not in ("fp16", "bf16", "tf32"):
            setattr(ns, key, value)
    stats = token_stats(ns) if ns.data_path else None
    return ns, settings, target, stats, opts


def main(argv=None) -> None:
    import json

    from qlaunch.oom import options_that_fit

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        sys.exit(0)
    try:
        ns, settings, target, stats, opts = prepare_plan(argv)
        plan = planned(ns, settings, target, stats, options_that_fit)
    except UsageError as e:
        print(e.render("qlaunch.plan"), file=sys.stderr)
        sys.exit(2)
    if opts.json:
        print(json.dumps(plan, indent=2, default=str))
    else:
        for note in settings.notes:
            print(f"[qlaunch] {note}", file=sys.stderr)
        print(format_plan(plan))


if __name__ == "__main__":
    main()
