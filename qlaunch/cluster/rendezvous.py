"""Rendezvous: torchrun's flags for one node, many nodes, restarts and SLURM, and the loopback
environment of a one-process run that has no launcher."""
from __future__ import annotations

import socket

from qlaunch.config.environment import LAUNCHER_VARIABLES


def is_loopback(addr: str) -> bool:
    return addr.startswith("127.") or addr in ("localhost", "::1")

def rendezvous(env: dict, nnodes: int, nproc: int, *, restarts: int, c10d: bool, endpoint: tuple[str, int] | None,
               node_rank: int | None, rdzv_id: str, is_host: bool | None = None,
               local_addr: str | None = None) -> tuple[list[str], dict]:
    """torchrun's rendezvous flags and the env they need. endpoint None: --standalone. local_addr: this
    node's address on the job network; the agent of rank 0 publishes it as the workers' MASTER_ADDR
    (without it torch publishes socket.getfqdn(), which need not resolve on that network)."""
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
    if endpoint is not None and is_loopback(endpoint[0]):
        flags.append("--local_addr=127.0.0.1")  # advertise loopback; else torch uses socket.getfqdn()
    elif endpoint is not None and local_addr:
        flags.append(f"--local_addr={local_addr}")
    return flags, extra_env

def single_process_env(env: dict, port: int) -> dict:
    """The variables a launcher would give one process, on loopback; {} under a launcher.

    finetune.py applies this at startup when --deepspeed is given without torchrun/deepspeed/srun:
    otherwise DeepSpeed falls back to mpi4py and takes MASTER_ADDR from `hostname -I`.
    """
    if any(k in env for k in LAUNCHER_VARIABLES):
        return {}
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": env.get("MASTER_PORT") or str(port)}

def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def srun_task_env(env: dict, first_addr: str | None) -> dict:
    """The rank variables of a task started by plain `srun --ntasks-per-node=G python finetune.py` (one
    task per GPU, no torchrun in between), from SLURM's own: SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS;
    rank 0's address is the step's first node's NodeAddr (`first_addr`, else its name), the port derived
    from the job and step ids so every task computes the same one without talking. {} when a launcher
    already set them, outside a job step, or for a single task."""
    # SLURM_STEP_NUM_TASKS is set by srun for its step only: a batch script's own shell (sbatch --ntasks=N
    # sets SLURM_NTASKS there too) is never taken for a task of an N-task step.
    if any(k in env for k in LAUNCHER_VARIABLES) or "SLURM_STEP_NUM_TASKS" not in env:
        return {}
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or 1)
    if tasks < 2 or "SLURM_PROCID" not in env:
        return {}
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    first = first_addr or (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1").split(",")[0]
    job, step = int(env.get("SLURM_JOB_ID") or 0), int(env.get("SLURM_STEP_ID") or 0)
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": str(tasks), "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": str(max(tasks // max(nodes, 1), 1)),
            "MASTER_ADDR": first, "MASTER_PORT": str(30000 + (job * 7 + step) % 10000)}
