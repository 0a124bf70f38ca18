"""The request `python -m qlaunch.plan` (and the launcher's --engine auto) plans: finetune.py's flags parsed
and resolved for a target GPU and world size, the plan-only flags (--gpu, --num_gpus, ...) beside them."""
from __future__ import annotations

import argparse

from qlaunch.config.errors import UsageError
from qlaunch.memory.planner import Target, detected_target, token_stats

PLAN_ONLY_PREFIX = "--data_path is required"  # planning needs no data


def plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--gpu")
    p.add_argument("--gpu_memory_gb", type=float)
    p.add_argument("--gpu_capability")
    p.add_argument("--num_gpus", type=int, default=1)
    p.add_argument("--num_nodes", type=int, default=1)
    p.add_argument("--engine", choices=("auto",))
    p.add_argument("--json", action="store_true")
    return p


def target_from(opts) -> Target:
    from qlaunch.memory.gpus import custom_gpu, find_gpu, machine_for

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


def prepare_plan(argv: list[str], target: Target | None = None):
    """(args, settings, target, stats, plan options): finetune.py's parser and rules, for the target GPU
    (given, or from the plan flags in argv)."""
    from qlaunch.config.arguments import parse_namespace
    from qlaunch.config.checkpoint import require_library
    from qlaunch.config.resolve import resolve
    from qlaunch.config.validate import check_arguments

    opts, rest = plan_parser().parse_known_args(argv)
    target = target or target_from(opts)
    ns = parse_namespace(rest)
    ns.dry_run = True  # a config-only directory (no weights) is what planning needs
    problems = [p for p in check_arguments(ns) if not p.startswith(PLAN_ONLY_PREFIX)]
    settings = resolve(ns, target.machine, env={"WORLD_SIZE": str(target.world_size)})
    missing = require_library(settings.quant_method)  # planning does not load: libraries not needed here
    problems += [p for p in settings.problems if p != missing]
    if problems:
        raise UsageError(problems)
    if opts.engine == "auto" and (ns.deepspeed or ns.fsdp_config):
        raise UsageError("--engine auto chooses the engine: drop --deepspeed / --fsdp_config, or drop --engine auto.")
    for key, value in settings.overrides().items():  # what training would run with (q_lora → use_lora …)
        if hasattr(ns, key) and key not in ("fp16", "bf16", "tf32"):
            setattr(ns, key, value)
    stats = token_stats(ns) if ns.data_path else None
    return ns, settings, target, stats, opts
