"""`python -m qlaunch.plan`: the GPU memory a run will need, before launching it, from any machine.

The same flags as finetune.py (parsed by qlaunch.config.arguments, resolved by qlaunch.config.resolve with the
facts of the GPU planned for, so precision follows the training rules), plus:
  --gpu NAME | --gpu_memory_gb N --gpu_capability X.Y    the GPU (default: this machine)
  --num_gpus N --num_nodes N                             the world size (ZeRO partitions by it)
  --json                                                 one JSON object on stdout
Reads only config.json (as JSON: no remote code, no weights; a tokenizer only with --data_path).
The memory model is qlaunch.memory (planner, estimate); the fit verdict's options come from
re-planning (qlaunch.memory.fit).
finetune.py --dry_run prints the same plan for the machine it runs on.
"""
from __future__ import annotations

import argparse
import sys

from qlaunch.config.errors import UsageError
from qlaunch.memory.fit import options_that_fit, planned
from qlaunch.memory.planner import Target, detected_target, format_plan, token_stats

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


def prepare_plan(argv: list[str]):
    """(args, settings, target, stats): finetune.py's parser and rules, for the target GPU."""
    from qlaunch.config.arguments import parse_namespace
    from qlaunch.config.checkpoint import require_library
    from qlaunch.config.resolve import resolve
    from qlaunch.config.validate import check_arguments

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
