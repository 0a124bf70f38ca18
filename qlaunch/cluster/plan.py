"""python -m qlaunch.launch (console script `qlaunch-launch`): the launch command, built in Python.

`plan(args, env, facts)` is a pure function from the launcher's flags, the environment and the
machine facts (GPUs, CPUs, a free port, the SLURM allocation) to a `LaunchPlan`: the argv to exec,
the environment to add and the notes to print. `main()` prints the exact command and execs it
(`QLAUNCH_PRINT_ONLY=1` stops after printing). The scripts in launch/ are one-line wrappers;
the .sbatch files keep only SLURM's lines (the #SBATCH header, srun, the signal handling).

Modes: `single` — one process, `python finetune.py`; `dist` — torchrun over NNODES x processes
per node (one process in total: plain python, like single); `slurm` — run by srun on each node of
an allocation: torchrun with c10d rendezvous on the first node.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from qlaunch.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent  # the checkout (launch/, recipes/, ds_configs/)
PACKAGE = Path(__file__).resolve().parent

METHODS = {"qlora": "Q-LoRA (LoRA on a 4-bit NF4/GPTQ base)", "lora": "LoRA"}
MODES = {
    "single": "one process: python finetune.py (no torchrun, no DeepSpeed unless --deepspeed)",
    "dist": "torchrun on NNODES x processes-per-node; DeepSpeed ds_configs/zero2.json",
    "slurm": "inside sbatch (run by srun on every node): one torchrun per node, c10d rendezvous",
}
SCRIPT_SUFFIX = {"single": "single_gpu.sh", "dist": "ds.sh", "slurm": "slurm.sbatch"}
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
  RDZV id = job id. Processes per node: NPROC_PER_NODE, else GPUS_PER_NODE, else
  SLURM_GPUS_ON_NODE, else nvidia-smi -L, else 1 (CPU; OMP_NUM_THREADS = SLURM_CPUS_ON_NODE /
  processes). Preemption: SLURM sends SIGUSR1 120 s before the end (--signal=USR1@120);
  finetune.py checkpoints, stops and requeues the job (--requeue); a requeued run
  (SLURM_RESTART_COUNT>0) gets --resume_from_checkpoint auto."""


class LaunchError(UsageError):
    """Bad launcher flags or environment: the message, the usage, exit 2."""


@dataclass(frozen=True)
class Facts:
    """What the launcher reads from the machine; tests pass their own."""

    gpus: int = 0  # GPUs this process may use
    cpus: int = 1
    free_port: int = 29500  # a free TCP port on 127.0.0.1
    slurm_first_host: str | None = None  # first host of SLURM_JOB_NODELIST
    slurm_first_addr: str | None = None  # its NodeAddr


@dataclass
class LaunchPlan:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def command_line(self) -> str:
        return "+ " + shlex.join(self.argv)


# ---- flags ------------------------------------------------------------------------------
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
    for flag in ("model", "data", "config", "deepspeed", "output_dir"):
        if getattr(args, flag) == "":
            raise LaunchError(f"option --{flag} needs a non-empty value")
    if not args.config:
        if not args.model:
            raise LaunchError("-m/--model is required (or give a recipe with -c)")
        if not args.data:
            raise LaunchError("-d/--data is required (or give a recipe with -c)")
    args.finetune_args = extra
    return args


# ---- decisions (pure) ---------------------------------------------------------------------
def gpu_count(env: dict, nvidia_smi_lines: list[str]) -> int:
    """GPUs this process may use: nvidia-smi -L, capped by CUDA_VISIBLE_DEVICES."""
    n = sum(1 for line in nvidia_smi_lines if line.startswith("GPU "))
    if "CUDA_VISIBLE_DEVICES" in env:
        visible = env["CUDA_VISIBLE_DEVICES"].replace(" ", "")
        n = 0 if visible in ("", "-1", "NoDevFiles") else min(n, len(visible.split(",")))
    return n


def _positive(name: str, value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise LaunchError(f"{name} must be a positive integer, got '{value}'")
    return int(value)


def processes_per_node(env: dict, facts: Facts, mode: str) -> tuple[int, bool]:
    """(processes per node, on GPU)."""
    gpus = facts.gpus
    if mode == "slurm" and gpus == 0 and env.get("SLURM_GPUS_ON_NODE", "").isdigit():
        gpus = int(env["SLURM_GPUS_ON_NODE"])
    for name in ("NPROC_PER_NODE", "GPUS_PER_NODE"):
        if env.get(name):
            return _positive(f"processes per node ({name})", env[name]), gpus > 0
    return max(gpus, 1), gpus > 0


def checkout_file(*parts: str) -> str | None:
    """A file of the checkout (finetune.py, recipes/, ds_configs/); None when pip-installed without one."""
    path = ROOT.joinpath(*parts)
    return str(path) if path.is_file() else None


def finetune_argv(args: argparse.Namespace, env: dict, deepspeed: str | None) -> list[str]:
    """finetune.py and its arguments, in the documented order; -- arguments last so they win."""
    script = checkout_file("finetune.py")
    ft = [script] if script else ["-m", "qlaunch.cli"]  # torchrun and python both take -m
    recipe = args.config or checkout_file("recipes", f"{args.method}-default.yaml")
    if recipe:
        ft += ["--config", recipe]
    if args.model:
        ft += ["--model_name_or_path", args.model]
    if args.data:
        ft += ["--data_path", args.data]
    ft += ["--use_lora", "True", "--q_lora", "True" if args.method == "qlora" else "False"]
    out = args.output_dir or (None if args.config else f"output_{args.method}")
    if out:
        ft += ["--output_dir", out]
    if deepspeed:
        ft += ["--deepspeed", deepspeed]
    if args.mode == "slurm" and env.get("SLURM_RESTART_COUNT", "0") not in ("", "0"):
        ft += ["--resume_from_checkpoint", "auto"]
    return ft + list(args.finetune_args)


def _is_loopback(addr: str) -> bool:
    return addr.startswith("127.") or addr in ("localhost", "::1")


def rendezvous(env: dict, nnodes: int, nproc: int, *, restarts: int, c10d: bool, endpoint: tuple[str, int] | None,
               node_rank: int | None, rdzv_id: str, is_host: bool | None = None) -> tuple[list[str], dict]:
    """torchrun's rendezvous flags and the env they need. endpoint None: --standalone."""
    flags = [f"--nnodes={nnodes}", f"--nproc_per_node={nproc}"]
    extra_env = {}
    if endpoint is None:
        flags.append("--standalone")  # torchrun's own single-node c10d store on a free port
    elif c10d:
        flags += ["--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint[0]}:{endpoint[1]}", f"--rdzv_id={rdzv_id}"]
        if is_host is not None:
            flags.append(f"--rdzv_conf=is_host={int(is_host)}")
    else:
        flags += [f"--node_rank={node_rank}", f"--master_addr={endpoint[0]}", f"--master_port={endpoint[1]}"]
    if c10d or endpoint is None:
        flags.append(f"--max_restarts={restarts}")
        # Workers re-using the rendezvous TCPStore can read the previous attempt's keys after a
        # restart and hang in init_process_group (pytorch#135712); give them their own store.
        extra_env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = env.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if endpoint is not None and _is_loopback(endpoint[0]):
        flags.append("--local_addr=127.0.0.1")  # advertise loopback; else torch uses socket.getfqdn()
    return flags, extra_env


def _cpu_threads(env: dict, facts: Facts, nproc: int, on_gpu: bool) -> tuple[dict, list[str]]:
    if on_gpu:
        return {}, []
    threads = env.get("OMP_NUM_THREADS") or str(max(int(env.get("SLURM_CPUS_ON_NODE") or facts.cpus) // nproc, 1))
    note = (f"no GPU found: {nproc} CPU process(es) per node (finetune.py sets use_cpu, gloo), "
            f"OMP_NUM_THREADS={threads}")
    return {"OMP_NUM_THREADS": threads}, [note]


def plan(args: argparse.Namespace, env: dict, facts: Facts, python: str = sys.executable) -> LaunchPlan:
    """The command to exec for these flags, environment and machine. Raises LaunchError."""
    deepspeed = args.deepspeed
    if deepspeed is None and args.mode != "single":
        deepspeed = checkout_file("ds_configs", "zero2.json")  # None outside a checkout: plain DDP
    deepspeed = None if deepspeed == "none" else deepspeed
    from qlaunch.files import config_file_problems

    # The same check finetune.py makes, made here too so that N processes are not started for it.
    problems = config_file_problems(args.config, deepspeed)
    if problems:
        raise LaunchError(problems)
    ft = finetune_argv(args, env, deepspeed)
    restarts_text = env.get("MAX_RESTARTS", "0") or "0"
    if not restarts_text.isdigit():
        raise LaunchError(f"MAX_RESTARTS must be a number, got '{restarts_text}'")
    restarts = int(restarts_text)
    ds = deepspeed or "none"

    if args.mode == "single":
        out = LaunchPlan([python, *ft])
        if facts.gpus > 1 and not env.get("CUDA_VISIBLE_DEVICES"):
            out.env["CUDA_VISIBLE_DEVICES"] = "0"  # one GPU, like Qwen's single-GPU script
            out.notes.append("several GPUs: using GPU 0 (CUDA_VISIBLE_DEVICES=0)")
        return out

    if args.mode == "slurm":
        return _plan_slurm(args, env, facts, python, ft, restarts, ds)

    nnodes = _positive("NNODES", env.get("NNODES") or "1")
    node_rank_text = env.get("NODE_RANK") or "0"
    if not node_rank_text.isdigit():
        raise LaunchError(f"NODE_RANK must be a number, got '{node_rank_text}'")
    node_rank = int(node_rank_text)
    if node_rank >= nnodes:
        raise LaunchError(f"NODE_RANK={node_rank} must be < NNODES={nnodes}")
    nproc, on_gpu = processes_per_node(env, facts, "dist")
    threads_env, notes = _cpu_threads(env, facts, nproc, on_gpu)
    if nnodes == 1 and nproc == 1:
        notes.append("world size 1: running finetune.py directly (no torchrun)")
        return LaunchPlan([python, *ft], threads_env, notes)
    if nnodes > 1:
        if not env.get("MASTER_ADDR"):
            raise LaunchError(f"NNODES={nnodes}: set MASTER_ADDR to the address of node 0 (the same on every node)")
        endpoint = (env["MASTER_ADDR"], int(env.get("MASTER_PORT") or 29500))
    elif env.get("MASTER_PORT") or restarts > 0:
        endpoint = (env.get("MASTER_ADDR") or "127.0.0.1", int(env.get("MASTER_PORT") or facts.free_port))
    else:
        endpoint = None  # torchrun --standalone: its own store on a port it picks (no probing race)
    flags, rdzv_env = rendezvous(env, nnodes, nproc, restarts=restarts, c10d=restarts > 0, endpoint=endpoint,
                                 node_rank=node_rank, rdzv_id=env.get("RDZV_ID") or "qlaunch")
    where = "standalone (free port)" if endpoint is None else f"MASTER_ADDR={endpoint[0]} MASTER_PORT={endpoint[1]}"
    notes.append(f"torchrun: NNODES={nnodes} NODE_RANK={node_rank} nproc_per_node={nproc} {where} deepspeed={ds}")
    return LaunchPlan([python, "-m", "torch.distributed.run", *flags, *ft], {**threads_env, **rdzv_env}, notes)


def _plan_slurm(args, env, facts, python, ft, restarts, ds) -> LaunchPlan:
    job = env.get("SLURM_JOB_ID")
    if not job:
        raise LaunchError(f"not inside a SLURM job: submit with sbatch launch/{args.method}_slurm.sbatch ...")
    nnodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    node_id = int(env.get("SLURM_NODEID") or 0)
    first = facts.slurm_first_host or "localhost"
    # MASTER_ADDR/MASTER_PORT inherited from the submitting shell say nothing about this
    # allocation: ignore them. RDZV_HOST / RDZV_PORT override on purpose. The port must be the
    # same on every node without talking to the others: derived from the job id.
    host = env.get("RDZV_HOST") or facts.slurm_first_addr or first
    port = int(env.get("RDZV_PORT") or 20000 + int(job) % 10000)
    nproc, on_gpu = processes_per_node(env, facts, "slurm")
    threads_env, notes = _cpu_threads(env, facts, nproc, on_gpu)
    flags, rdzv_env = rendezvous(env, nnodes, nproc, restarts=restarts, c10d=True, endpoint=(host, port),
                                 node_rank=None, rdzv_id=env.get("RDZV_ID") or job, is_host=node_id == 0)
    if node_id == 0:
        notes.append(f"SLURM job {job} start: nodes={nnodes} ({env.get('SLURM_JOB_NODELIST', first)}) "
                     f"nproc_per_node={nproc} rendezvous={host}:{port} (first host {first}) "
                     f"restart={env.get('SLURM_RESTART_COUNT') or 0} deepspeed={ds}")
    return LaunchPlan([python, "-m", "torch.distributed.run", *flags, *ft], {**threads_env, **rdzv_env}, notes)


def single_process_env(env: dict, port: int) -> dict:
    """The variables a launcher would give one process, on loopback; {} under a launcher.

    finetune.py applies this at startup when --deepspeed is given without torchrun/deepspeed/srun:
    otherwise DeepSpeed falls back to mpi4py and takes MASTER_ADDR from `hostname -I`.
    """
    if any(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return {}
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": env.get("MASTER_PORT") or str(port)}


# ---- facts and side effects -------------------------------------------------------------
def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def _run(cmd: list[str]) -> str:
    if not shutil.which(cmd[0]):
        return ""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def detect_facts(env: dict, mode: str) -> Facts:
    first = addr = None
    if mode == "slurm" and env.get("SLURM_JOB_NODELIST"):
        hosts = _run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]]).split()
        first = hosts[0] if hosts else None
        if first:
            fields = _run(["scontrol", "show", "node", "-o", first]).split()
            addr = next((f.split("=", 1)[1] for f in fields if f.startswith("NodeAddr=")), None)
    return Facts(gpus=gpu_count(env, _run(["nvidia-smi", "-L"]).splitlines()), cpus=os.cpu_count() or 1,
                 free_port=free_port(), slurm_first_host=first, slurm_first_addr=addr)


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
        launch_plan = plan(args, env, detect_facts(env, args.mode), python)
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
    env.update(launch_plan.env)
    # Tools the run spawns (ninja for DeepSpeed's JIT ops, torchrun's workers) come from the
    # interpreter's environment first, as if it were activated.
    bindir = os.path.dirname(launch_plan.argv[0])
    if bindir:
        env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    os.execvpe(launch_plan.argv[0], launch_plan.argv, env)


if __name__ == "__main__":
    main()
