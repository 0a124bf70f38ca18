"""python -m qlaunch.launch (console script `qlaunch-launch`): the launch command, built in Python.

The flags are parsed here; `qlaunch.cluster.plan.plan(args, env, facts)` turns them, the
environment and the machine facts into the command; `main()` prints the exact command and execs
it (`QLAUNCH_PRINT_ONLY=1` stops after printing). The scripts in launch/ are one-line wrappers;
the .sbatch files keep only SLURM's lines (the #SBATCH header, srun, the signal handling).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from qlaunch.cluster.facts import LaunchError, detect_facts
from qlaunch.cluster.plan import METHODS, MODES, SCRIPT_SUFFIX, plan

ENVIRONMENT = """\
Environment:
  NNODES (1)  NODE_RANK (0)  MASTER_ADDR (127.0.0.1 on one node; required with NNODES>1)
  MASTER_PORT (on one node: torchrun --standalone picks a free port; 29500 with NNODES>1)
  GPUS_PER_NODE   processes per node on GPU machines (default: nvidia-smi -L, respecting
                  CUDA_VISIBLE_DEVICES)
  NPROC_PER_NODE  processes per node, overrides everything (without a GPU: CPU processes
                  with gloo, default 1; finetune.py sets use_cpu and gloo itself)
  MAX_RESTARTS    torchrun --max_restarts; > 0 switches to c10d rendezvous (RDZV_ID names it)
  PYTHON          interpreter (default: the one running this launcher)
  OMP_NUM_THREADS on CPU defaults to CPUs / processes per node
  QLAUNCH_PRINT_ONLY=1  print the command and exit without running it"""
SLURM_HELP = """
SLURM: sbatch [--nodes=N] [--gres=gpu:G] [--cpus-per-task=C] [--exclusive] launch/METHOD_slurm.sbatch -m MODEL -d DATA [...]
  srun starts this launcher once per node (--ntasks-per-node=1, --cpus-per-task passed on).
  c10d rendezvous on the NodeAddr of the first host of the allocation (override: RDZV_HOST,
  RDZV_PORT; an inherited MASTER_ADDR/MASTER_PORT/NNODES is ignored); the node with
  SLURM_NODEID=0 hosts the store (is_host), so it does not depend on interface matching.
  Each node passes its own NodeAddr as torchrun's --local_addr (override: LOCAL_ADDR): the workers'
  MASTER_ADDR is then rank 0's NodeAddr, not its hostname. One CPU per task (no --cpus-per-task)
  is warned about. RDZV id = job id. Processes per node: NPROC_PER_NODE, else GPUS_PER_NODE, else
  SLURM_GPUS_ON_NODE, else nvidia-smi -L, else 1 (CPU; OMP_NUM_THREADS = SLURM_CPUS_ON_NODE /
  processes). Preemption: SLURM sends SIGUSR1 120 s before the end (--signal=USR1@120);
  finetune.py checkpoints, stops and requeues the job (--requeue); a requeued run
  (SLURM_RESTART_COUNT>0) gets --resume_from_checkpoint auto."""

class _Formatter(argparse.RawDescriptionHelpFormatter):
    """`Usage:` and `-m, --model PATH_OR_ID`, as the scripts' help always read."""

    def add_usage(self, usage, actions, groups, prefix=None):
        return super().add_usage(usage, actions, groups, "Usage: " if prefix is None else prefix)

    def _format_action_invocation(self, action):
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{', '.join(action.option_strings)} {metavar}"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise LaunchError(message)


def make_parser(method: str = "qlora", mode: str = "dist", prog: str | None = None) -> argparse.ArgumentParser:
    prog = prog or f"{method}_{SCRIPT_SUFFIX[mode]}"
    parser = _Parser(
        prog=prog, formatter_class=_Formatter, add_help=False, allow_abbrev=False,
        usage=f"{prog} -m MODEL -d DATA [options] [-- FINETUNE_FLAGS...]\n"
              f"       {prog} -c RECIPE.yaml [options] [-- FINETUNE_FLAGS...]",
        description=f"{METHODS[method]} fine-tuning with finetune.py; {MODES[mode]}.",
        epilog=ENVIRONMENT + (SLURM_HELP if mode == "slurm" else ""),
    )
    parser.add_argument("-m", "--model", metavar="PATH_OR_ID", help="base model (--model_name_or_path)")
    parser.add_argument("-d", "--data", metavar="PATH", help="training data .json/.jsonl (--data_path)")
    parser.add_argument("-c", "--config", metavar="RECIPE.yaml",
                        help=f"recipe (keys = finetune.py flags); replaces recipes/{method}-default.yaml")
    parser.add_argument("--deepspeed", metavar="CONFIG",
                        help="DeepSpeed JSON (ds_configs/zero{2,3}[_offload].json), or 'none' (default: "
                             f"{'ds_configs/zero2.json' if mode != 'single' else 'none'})")
    parser.add_argument("--fsdp", metavar="CONFIG",
                        help="FSDP2 JSON (fsdp_configs/fsdp2[_offload].json): shard the model with FSDP2, no DeepSpeed")
    parser.add_argument("--engine", choices=("auto",),
                        help="auto: the cheapest engine whose planned memory fits this machine's GPUs (DDP, ZeRO-2, "
                             "ZeRO-3, FSDP2, then their offload variants: python -m qlaunch.plan --engine auto); "
                             "needs a local model directory")
    parser.add_argument("-o", "--output_dir", "--output-dir", dest="output_dir", metavar="DIR",
                        help=f"adapter, checkpoints and report (default: output_{method}, or the recipe's with -c)")
    parser.add_argument("--method", choices=tuple(METHODS), default=method, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=tuple(MODES), default=mode, help=argparse.SUPPRESS)
    parser.add_argument("-h", "--help", action="store_true", help="this help")
    parser.add_argument("finetune_args", nargs="*", metavar="-- FINETUNE_FLAGS",
                        help="everything after -- goes to finetune.py verbatim (the last value of a flag wins)")
    return parser


def method_and_mode(argv: list[str], method: str, mode: str) -> tuple[str, str]:
    """--method / --mode as given by a wrapper script (they decide the defaults shown in --help)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default=method)
    pre.add_argument("--mode", default=mode)
    known, _ = pre.parse_known_args(argv[: argv.index("--")] if "--" in argv else argv)
    return (known.method if known.method in METHODS else method, known.mode if known.mode in MODES else mode)


def parse(argv: list[str], method: str = "qlora", mode: str = "dist") -> argparse.Namespace:
    """The launcher's flags; everything after `--` is kept verbatim for finetune.py."""
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    args = make_parser(*method_and_mode(argv, method, mode)).parse_args(argv)
    if args.help:
        return args
    if args.finetune_args:
        raise LaunchError(f"unexpected argument: {args.finetune_args[0]} (finetune.py flags go after --)")
    for flag in ("model", "data", "config", "deepspeed", "fsdp", "output_dir"):
        if getattr(args, flag) == "":
            raise LaunchError(f"option --{flag} needs a non-empty value")
    if not args.config:
        if not args.model:
            raise LaunchError("-m/--model is required (or give a recipe with -c)")
        if not args.data:
            raise LaunchError("-d/--data is required (or give a recipe with -c)")
    args.finetune_args = extra
    return args

def auto_engine(args: argparse.Namespace, env: dict, facts, target=None) -> str:
    """--engine auto: plan this job for the world size the command starts, on this machine's GPU (target:
    tests pass GPU facts), and set args.deepspeed / args.fsdp to the cheapest engine that fits. Returns the
    note saying what was chosen and why. Raises LaunchError when nothing fits or the job cannot be planned."""
    from qlaunch.cluster.plan import checkout_file, finetune_argv, world_size_of
    from qlaunch.config.errors import UsageError
    from qlaunch.memory.fit import choose_engine, engine_choice_text
    from qlaunch.memory.planner import detected_target
    from qlaunch.memory.prepare import prepare_plan

    given = [f for f in ("--deepspeed", "--fsdp_config") if f in args.finetune_args]
    if args.deepspeed not in (None, "none") or args.fsdp or given:
        raise LaunchError("--engine auto chooses the engine: drop --deepspeed / --fsdp" +
                          (f" (and {' '.join(given)} after --)" if given else "") + ", or drop --engine auto.")
    nproc, nnodes = world_size_of(args, env, facts)
    target = dataclasses.replace(target or detected_target({"WORLD_SIZE": "1"}), num_gpus=nproc, num_nodes=nnodes)
    argv = finetune_argv(args, env, None, None)[1:]  # finetune.py's flags, without the script
    if "--data_path" in argv:  # planned without the data: tokenizing a large dataset is finetune.py's job, and
        at = argv.index("--data_path")  # without its statistics the plan counts every position (the upper bound)
        argv = argv[:at] + argv[at + 2:]
    try:
        ns, settings, _, stats, _ = prepare_plan(argv, target)
        choice, choices, _ = choose_engine(ns, settings, target, stats)
    except UsageError as e:
        raise LaunchError([f"--engine auto: {p}" for p in e.problems]) from None
    text = engine_choice_text(choice, choices, target)
    if choice is None:
        raise LaunchError(text)
    flag, _, config = choice["flag"].partition(" ")
    path = checkout_file(*config.split("/")) if config else None
    if config and path is None:
        raise LaunchError(f"{text}, but {config} is not here (a pip install without the checkout): pass it yourself")
    args.deepspeed, args.fsdp = (path, None) if flag == "--deepspeed" else ("none", path)
    return text


def launch_plan_for(args: argparse.Namespace, env: dict, facts, python: str, target=None):
    """The launch plan; with --engine auto, for the engine chosen (its note first)."""
    chosen = auto_engine(args, env, facts, target) if args.engine == "auto" else None
    launch_plan = plan(args, env, facts, python)
    if chosen:
        launch_plan.notes.insert(0, chosen)
    return launch_plan


def preflight(launch_plan, args: argparse.Namespace, env: dict, facts) -> list[str]:
    """finetune.py's own checks (the same parser, domains, paths and resolved settings) of the command about
    to start, run once here: a bad flag, path or file is one line and exit 2 before N processes start,
    instead of N copies of it and torchrun's failure report."""
    from qlaunch.cluster.plan import world_size_of
    from qlaunch.config.arguments import parse_namespace
    from qlaunch.config.errors import UsageError
    from qlaunch.config.machine import Machine
    from qlaunch.config.resolve import resolve
    from qlaunch.config.validate import check_arguments

    nproc, nnodes = world_size_of(args, env, facts)
    rank_env = {"WORLD_SIZE": str(nproc * nnodes), "RANK": "0", "LOCAL_RANK": "0",
                **{k: v for k, v in env.items() if k.startswith("QLAUNCH_")}}
    try:
        ns = parse_namespace(launch_plan.finetune_flags)
    except UsageError as e:
        return list(e.problems)
    return check_arguments(ns) + resolve(ns, Machine.detect(), env=rank_env).problems


def note(message: str) -> None:
    print(f"[qlaunch {time.strftime('%Y-%m-%d %H:%M:%S')}] {message}", file=sys.stderr, flush=True)

def main(argv: list[str] | None = None, method: str = "qlora", mode: str = "dist") -> None:
    argv = sys.argv[1:] if argv is None else argv
    env = dict(os.environ)
    try:
        args = parse(argv, method, mode)
        if args.help:
            make_parser(args.method, args.mode).print_help()
            sys.exit(0)
        python = env.get("PYTHON") or sys.executable
        facts = detect_facts(env, args.mode)
        launch_plan = launch_plan_for(args, env, facts, python)
    except LaunchError as e:
        parser = make_parser(*method_and_mode(argv, method, mode))
        print("\n".join(f"{parser.prog}: {p}" for p in e.problems), file=sys.stderr)
        print(file=sys.stderr)
        parser.print_help(sys.stderr)
        sys.exit(2)
    for line in launch_plan.notes:
        note(line)
    print(launch_plan.command_line(), file=sys.stderr, flush=True)
    if env.get("QLAUNCH_PRINT_ONLY") == "1":
        sys.exit(0)
    problems = preflight(launch_plan, args, env, facts)
    if problems:
        from qlaunch.config.errors import UsageError

        print(UsageError(problems).render(make_parser(args.method, args.mode).prog) + "\nNothing was started.",
              file=sys.stderr)
        sys.exit(2)
    env.update(launch_plan.env)
    # Tools the run spawns (ninja for DeepSpeed's JIT ops, torchrun's workers) come from the
    # interpreter's environment first, as if it were activated.
    bindir = os.path.dirname(launch_plan.argv[0])
    if bindir:
        env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    os.execvpe(launch_plan.argv[0], launch_plan.argv, env)


if __name__ == "__main__":
    main()
