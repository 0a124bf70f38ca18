"""What the launcher knows about where it runs: the machine facts it reads (GPUs, CPUs, a free port,
the SLURM allocation), the plan it returns, and the decisions that follow from the facts alone
(processes per node, CPU threads). Reading the machine (detect_facts) is kept apart from deciding,
so tests pass their own Facts."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field

from qlaunch.cluster.rendezvous import free_port
from qlaunch.config.errors import UsageError


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
    slurm_node_addr: str | None = None  # this node's NodeAddr (what its workers are reached at)

@dataclass
class LaunchPlan:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    finetune_flags: list[str] = field(default_factory=list)  # what finetune.py is given (checked before exec)

    def command_line(self) -> str:
        return "+ " + shlex.join(self.argv)

def gpu_count(env: dict, nvidia_smi_lines: list[str]) -> int:
    """GPUs this process may use: nvidia-smi -L, capped by CUDA_VISIBLE_DEVICES."""
    n = sum(1 for line in nvidia_smi_lines if line.startswith("GPU "))
    if "CUDA_VISIBLE_DEVICES" in env:
        visible = env["CUDA_VISIBLE_DEVICES"].replace(" ", "")
        n = 0 if visible in ("", "-1", "NoDevFiles") else min(n, len(visible.split(",")))
    return n

def positive(name: str, value: str) -> int:
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
            return positive(f"processes per node ({name})", env[name]), gpus > 0
    return max(gpus, 1), gpus > 0

def cpu_threads(env: dict, facts: Facts, nproc: int, on_gpu: bool) -> tuple[dict, list[str]]:
    if on_gpu:
        return {}, []
    threads = env.get("OMP_NUM_THREADS") or str(max(int(env.get("SLURM_CPUS_ON_NODE") or facts.cpus) // nproc, 1))
    note = (f"no GPU found: {nproc} CPU process(es) per node (finetune.py sets use_cpu, gloo), "
            f"OMP_NUM_THREADS={threads}")
    return {"OMP_NUM_THREADS": threads}, [note]

def run_quietly(cmd: list[str]) -> str:
    if not shutil.which(cmd[0]):
        return ""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""

def detect_facts(env: dict, mode: str) -> Facts:
    first = addr = own = None
    if mode == "slurm" and env.get("SLURM_JOB_NODELIST"):
        hosts = run_quietly(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]]).split()
        first = hosts[0] if hosts else None
        if first:
            addr = node_addr(first)
        if env.get("SLURMD_NODENAME"):
            own = addr if env["SLURMD_NODENAME"] == first else node_addr(env["SLURMD_NODENAME"])
    return Facts(gpus=gpu_count(env, run_quietly(["nvidia-smi", "-L"]).splitlines()), cpus=os.cpu_count() or 1,
                 free_port=free_port(), slurm_first_host=first, slurm_first_addr=addr, slurm_node_addr=own)


def node_addr(node: str) -> str | None:
    """A SLURM node's NodeAddr: its address on the job network, which its hostname may not resolve to."""
    fields = run_quietly(["scontrol", "show", "node", "-o", node]).split()
    return next((f.split("=", 1)[1] for f in fields if f.startswith("NodeAddr=")), None)
