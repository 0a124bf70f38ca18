"""The memory plan of a run: from the flags, the resolved settings, the target devices and the model's
shape (config.json) to a JSON-ready dict of per-device bytes by component and phase, and its text.

The byte model itself is qlaunch.memory.estimate; whether it fits, and what would, is
qlaunch.memory.fit; `python -m qlaunch.plan` is the command that prints it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace

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
    from qlaunch.config.machine import Machine

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
        from qlaunch.model.load import load_tokenizer

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


def logits_fraction(args, stats: dict | None, shape=None) -> float:
    """Share of positions that reach lm_head: with --labelled_logits_only (qlaunch/train/loss.py) the
    trained tokens of the data; without data, with the flag off, or for a model that runs its own
    modelling code (Qwen(1): the Trainer falls back to every position), every position."""
    if shape is not None and shape.remote_loss:
        return 1.0
    if not getattr(args, "labelled_logits_only", False) or not stats or not stats.get("trained_tokens"):
        return 1.0
    return min(1.0, stats["trained_tokens"] / max(stats["tokens"], 1))


def parameter_lora_matrices(shapes, r: int) -> tuple[tuple[int, int], ...]:
    """(rows, cols) of the A and B matrices peft's ParamWrapper adds per targeted parameter (--lora_target_parameters):
    r·experts × d2 and d1 × r·experts for [experts, d1, d2], r × d1 and d0 × r for a 2-D [d0, d1]."""
    out = []
    for shape in shapes:
        experts, d1, d2 = (1, *shape) if len(shape) == 2 else shape
        out += [(r * experts, d2), (d1, r * experts)]
    return tuple(out)


def build_job(args, settings, target: Target, seq_len: int, logits_share: float = 1.0):
    from qlaunch.config.engine import engine_of
    from qlaunch.memory.estimate import Job

    engine = engine_of(getattr(args, "deepspeed", None), getattr(args, "fsdp_config", None))
    return Job(
        quant=settings.quant_method,
        double_quant=bool(args.bnb_4bit_use_double_quant),
        compute_bytes=_bytes(settings.compute_dtype),
        base_bytes=_bytes(settings.base_dtype),
        use_lora=bool(args.use_lora or args.q_lora),
        lora_r=int(args.lora_r),
        lora_targets=tuple(args.lora_target_modules or ()),
        parameter_lora=parameter_lora_matrices(getattr(settings, "target_parameter_shapes", ()), int(args.lora_r)),
        lora_dropout=float(args.lora_dropout),
        dora=bool(getattr(args, "use_dora", False)),
        modules_to_save=tuple(args.lora_modules_to_save or ()),
        fp32_trainables=bool(settings.fp32_trainables),
        optim=str(_value(args.optim)),
        micro_batch=int(args.per_device_train_batch_size),
        seq_len=seq_len,
        logits_fraction=logits_share,
        checkpointing=bool(args.activation_checkpointing or getattr(args, "gradient_checkpointing", False)),
        attention=args.attn_implementation or "sdpa",
        packing=bool(getattr(args, "packing", False)),
        engine=engine.name,
        zero_stage=engine.zero_stage,
        offload_optimizer=engine.offload_optimizer,
        offload_params=engine.offload_params,
        reuse_distance=engine.reuse_distance,
        world_size=target.world_size,
        cuda=bool(target.machine.cuda),
    )


def compute(args, settings, target: Target, shape, stats: dict | None = None) -> dict:
    """The plan as a JSON-ready dict (no verdict options)."""
    from qlaunch.memory.estimate import plan_memory

    job = build_job(args, settings, target, planned_seq_len(args, stats), logits_fraction(args, stats, shape))
    plan = plan_memory(shape, job)
    peak = max(plan.peak_bytes, plan.load_bytes)  # the verdict follows the larger of loading and training
    gb = {"per_device_peak": peak / GiB, "peak_phase": plan.peak_phase if plan.peak_bytes >= plan.load_bytes else "load",
          "training_peak": plan.peak_bytes / GiB, "load_peak": plan.load_bytes / GiB,
          "load": {k: v / GiB for k, v in plan.load.items()},
          "load_host": {k: v / GiB for k, v in plan.load_host.items()},
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
        "total_gib_estimate": peak / GiB,
    }
    experts = getattr(settings, "experts", None)
    if experts is not None:  # an MoE base: counted on its meta skeleton (config.moe)
        out["experts"] = {"per_layer": experts.experts, "per_token": experts.per_token,
                          "parameters": experts.total_params, "active_parameters": experts.active_params,
                          "fused_expert_parameters": experts.fused_params}
    return out


def format_plan(plan: dict) -> str:
    gb = plan["memory_gb"]
    device = plan["device"]
    where = (f"{plan['world_size']}x {device['name']} ({device['memory_gb']:.1f} GB, cc {device['capability']})"
             if device["memory_gb"] else f"{device['name']}, {plan['world_size']} process(es)")
    job = plan["job"]
    moe = plan.get("experts")
    active = (f" ({moe['active_parameters']:,} active per token: {moe['per_token']} of {moe['per_layer']} experts)"
              if moe else "")
    lines = [f"Memory plan: {plan['parameters']:,} parameters{active}, {plan['trainable_parameters']:,} trainable — "
             f"{where}",
             f"  {plan['quantization'] or 'full precision'} base, {plan['precision']['compute_dtype']} compute, "
             f"batch {job['micro_batch']} x {job['seq_len']} tokens, "
             f"{'activation checkpointing' if job['checkpointing'] else 'no checkpointing'}, {job['attention']}, "
             f"{job['optim']}" + (f", ZeRO-{job['zero_stage']}" if job["zero_stage"] else "")
             + (", FSDP2" + (" + CPU offload" if job["offload_params"] else "") if job["engine"] == "fsdp2" else "")]
    if plan.get("tokens"):
        t = plan["tokens"]
        lines.append(f"  data: {t['error']}" if "error" in t else
                     f"  data: {t['samples']} samples, {t['tokens']:,} tokens, mean {t['mean']:.0f}, p95 {t['p95']}, "
                     f"max {t['max']} (the plan uses the longest)")
    lines.append("  held all step:")
    lines += [f"    {name:40} {v:8.2f} GB" for name, v in gb["persistent"].items() if v >= 0.005]
    training = "training step" if gb["peak_phase"] == "load" else gb["peak_phase"]
    lines.append(f"  at the training peak ({training}):")
    lines += [f"    {name:40} {v:8.2f} GB" for name, v in gb["peak_transient"].items() if v >= 0.005]
    lines.append(f"  {'training peak per device':42} {gb['training_peak']:8.2f} GB")
    lines.append("  while loading (before the engine shards):")
    lines += [f"    {name:40} {v:8.2f} GB" for name, v in gb["load"].items() if v >= 0.005]
    lines.append(f"  {'load peak per device':42} {gb['load_peak']:8.2f} GB")
    host = gb.get("load_host") or {}
    if any(k.startswith("each rank") for k in host):  # an MoE's 16-bit experts, before they are packed
        lines.append(f"  {'host memory while loading, each rank':42} {sum(host.values()):8.2f} GB (the experts arrive "
                     "16-bit; each stack is quantized onto the GPU)")
    elif host:
        rank0 = sum(v for k, v in host.items() if k.startswith("rank 0"))
        others = sum(v for k, v in host.items() if not k.startswith("rank 0"))
        lines.append(f"  {'host memory while loading, rank 0':42} {rank0:8.2f} GB (the 4-bit base is built there)")
        lines.append(f"  {'host memory while loading, other ranks':42} {others:8.2f} GB (the skeleton rank 0 sends)")
    lines.append(f"  {'peak per device':42} {gb['per_device_peak']:8.2f} GB"
                 + (" (loading)" if gb["peak_phase"] == "load" else ""))
    if plan.get("fit"):
        lines.append(f"  verdict: {plan['fit']['text']}")
    return "\n".join(lines)


# ---- planning from finetune.py's own objects -------------------------------------------------


def memory_plan(config, target: Target | None = None, stats: dict | None = None) -> dict:
    """The plan of a parsed, resolved finetune.py Config (dry run, OOM report, metrics.json)."""
    from qlaunch.config.checkpoint import read_config
    from qlaunch.memory.shape import model_shape

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
