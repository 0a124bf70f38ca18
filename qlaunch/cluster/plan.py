"""The launch plan: `plan(args, env, facts)` is a pure function from the launcher's flags, the
environment and the machine facts to a `LaunchPlan` — the argv to exec, the environment to add and
the notes to print. qlaunch.launch (the command) parses the flags, prints the plan and execs it.

Modes: `single` — one process, `python finetune.py`; `dist` — torchrun over NNODES x processes
per node (one process in total: plain python, like single); `slurm` — run by srun on each node of
an allocation: torchrun with c10d rendezvous on the first node (qlaunch.cluster.slurm).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qlaunch.cluster.facts import Facts, LaunchError, LaunchPlan, cpu_threads, positive, processes_per_node
from qlaunch.cluster.rendezvous import rendezvous
from qlaunch.cluster.slurm import plan_slurm

ROOT = Path(__file__).resolve().parents[2]  # the checkout (launch/, recipes/, ds_configs/)

METHODS = {"qlora": "Q-LoRA (LoRA on a 4-bit NF4/GPTQ base)", "lora": "LoRA"}
MODES = {
    "single": "one process: python finetune.py (no torchrun, no DeepSpeed unless --deepspeed)",
    "dist": "torchrun on NNODES x processes-per-node; DeepSpeed ds_configs/zero2.json",
    "slurm": "inside sbatch (run by srun on every node): one torchrun per node, c10d rendezvous",
}
SCRIPT_SUFFIX = {"single": "single_gpu.sh", "dist": "ds.sh", "slurm": "slurm.sbatch"}


def checkout_file(*parts: str) -> str | None:
    """A file of the checkout (finetune.py, recipes/, ds_configs/); None when pip-installed without one."""
    path = ROOT.joinpath(*parts)
    return str(path) if path.is_file() else None

def finetune_argv(args: argparse.Namespace, env: dict, deepspeed: str | None, fsdp: str | None = None) -> list[str]:
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
    if fsdp:
        ft += ["--fsdp_config", fsdp]
    if args.mode == "slurm" and env.get("SLURM_RESTART_COUNT", "0") not in ("", "0"):
        ft += ["--resume_from_checkpoint", "auto"]
    return ft + list(args.finetune_args)

def engine_configs(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(DeepSpeed config, FSDP2 config): --fsdp CONFIG uses FSDP2 and no DeepSpeed; otherwise
    --deepspeed, whose default off `single` mode is ds_configs/zero2.json (none outside a checkout)."""
    fsdp = getattr(args, "fsdp", None)
    if fsdp:
        if args.deepspeed not in (None, "none"):
            raise LaunchError("--fsdp and --deepspeed: one engine shards the model; pass one of them.")
        return None, fsdp
    deepspeed = args.deepspeed
    if deepspeed is None and args.mode != "single":
        deepspeed = checkout_file("ds_configs", "zero2.json")
    return (None if deepspeed == "none" else deepspeed), None


def world_size_of(args: argparse.Namespace, env: dict, facts: Facts) -> tuple[int, int]:
    """(processes per node, nodes) the command will start (what --engine auto plans for)."""
    if args.mode == "single":
        return 1, 1
    nproc, _ = processes_per_node(env, facts, args.mode)
    if args.mode == "slurm":
        return nproc, int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    return nproc, positive("NNODES", env.get("NNODES") or "1")


def plan(args: argparse.Namespace, env: dict, facts: Facts, python: str = sys.executable) -> LaunchPlan:
    """The command to exec for these flags, environment and machine. Raises LaunchError."""
    from qlaunch.config.environment import LAUNCH_VARIABLES, integer_variable_problems
    from qlaunch.config.files import config_file_problems

    problems = integer_variable_problems(env, LAUNCH_VARIABLES)
    if problems:
        raise LaunchError(problems)
    deepspeed, fsdp = engine_configs(args)
    # The same check finetune.py makes, made here too so that N processes are not started for it.
    problems = config_file_problems(args.config, deepspeed, fsdp)
    if problems:
        raise LaunchError(problems)
    ft = finetune_argv(args, env, deepspeed, fsdp)
    restarts = int(env.get("MAX_RESTARTS") or 0)  # the domains above were checked
    ds = (deepspeed or "none") + (f" fsdp={fsdp}" if fsdp else "")
    launch_plan = plan_for_mode(args, env, facts, python, ft, restarts, ds)
    launch_plan.finetune_flags = ft[2:] if ft[0] == "-m" else ft[1:]
    return launch_plan


def plan_for_mode(args, env: dict, facts: Facts, python: str, ft: list[str], restarts: int, ds: str) -> LaunchPlan:
    """The command for the launch mode: python alone, srun + torchrun (SLURM) or torchrun."""
    if args.mode == "single":
        out = LaunchPlan([python, *ft])
        if facts.gpus > 1 and not env.get("CUDA_VISIBLE_DEVICES"):
            out.env["CUDA_VISIBLE_DEVICES"] = "0"  # one GPU, like Qwen's single-GPU script
            out.notes.append("several GPUs: using GPU 0 (CUDA_VISIBLE_DEVICES=0)")
        return out

    if args.mode == "slurm":
        return plan_slurm(args, env, facts, python, ft, restarts, ds)

    nnodes = positive("NNODES", env.get("NNODES") or "1")
    node_rank = int(env.get("NODE_RANK") or 0)
    if node_rank >= nnodes:
        raise LaunchError(f"NODE_RANK={node_rank} must be < NNODES={nnodes}")
    nproc, on_gpu = processes_per_node(env, facts, "dist")
    threads_env, notes = cpu_threads(env, facts, nproc, on_gpu)
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
