"""`python -m qlaunch.plan`: the GPU memory a run will need, before launching it, from any machine.

The same flags as finetune.py (parsed by qlaunch.config.arguments, resolved by qlaunch.config.resolve with the
facts of the GPU planned for, so precision follows the training rules), plus:
  --gpu NAME | --gpu_memory_gb N --gpu_capability X.Y    the GPU (default: this machine)
  --num_gpus N --num_nodes N                             the world size (ZeRO partitions by it)
  --engine auto                                          choose the cheapest engine that fits (DDP, ZeRO-2,
                                                         ZeRO-3, FSDP2, then their offload variants) and plan it
  --json                                                 one JSON object on stdout
Reads only config.json (as JSON: no remote code, no weights; a tokenizer only with --data_path).
The memory model is qlaunch.memory (planner, estimate); the fit verdict's options come from
re-planning (qlaunch.memory.fit).
finetune.py --dry_run prints the same plan for the machine it runs on.
"""
from __future__ import annotations

import sys

from qlaunch.config.errors import UsageError
from qlaunch.memory.fit import choose_engine, engine_choice_text, options_that_fit, planned
from qlaunch.memory.planner import format_plan
from qlaunch.memory.prepare import plan_parser, prepare_plan, target_from  # noqa: F401  (tests, README)

def main(argv=None) -> None:
    import json

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        sys.exit(0)
    try:
        ns, settings, target, stats, opts = prepare_plan(argv)
        choice_text = None
        if opts.engine == "auto":
            choice, choices, ns = choose_engine(ns, settings, target, stats)
            choice_text = engine_choice_text(choice, choices, target)
        plan = planned(ns, settings, target, stats, options_that_fit)
        if choice_text:
            plan["engine_choice"] = {"chosen": choice, "tried": choices, "text": choice_text}
    except UsageError as e:
        print(e.render("qlaunch.plan"), file=sys.stderr)
        sys.exit(2)
    if opts.json:
        print(json.dumps(plan, indent=2, default=str))
    else:
        for note in settings.notes:
            print(f"[qlaunch] {note}", file=sys.stderr)
        print(format_plan(plan))
        if choice_text:
            print(choice_text)


if __name__ == "__main__":
    main()
