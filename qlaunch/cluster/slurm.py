"""Inside a SLURM allocation: one torchrun per node, c10d rendezvous at the first node's address."""
from __future__ import annotations

from qlaunch.cluster.facts import Facts, LaunchError, LaunchPlan, cpu_threads, processes_per_node
from qlaunch.cluster.rendezvous import rendezvous


def plan_slurm(args, env: dict, facts: Facts, python: str, ft: list[str], restarts: int, ds: str) -> LaunchPlan:
    """The torchrun command of this node of the SLURM job. Raises LaunchError outside a job."""
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
    threads_env, notes = cpu_threads(env, facts, nproc, on_gpu)
    # The workers' MASTER_ADDR is what rank 0's agent publishes: this node's NodeAddr (LOCAL_ADDR overrides).
    local = env.get("LOCAL_ADDR") or facts.slurm_node_addr
    flags, rdzv_env = rendezvous(env, nnodes, nproc, restarts=restarts, c10d=True, endpoint=(host, port),
                                 node_rank=None, rdzv_id=env.get("RDZV_ID") or job, is_host=node_id == 0,
                                 local_addr=local)
    if env.get("SLURM_CPUS_PER_TASK", "1") in ("", "1") and node_id == 0:
        notes.append(f"warning: SLURM gives each task 1 CPU unless asked (SLURM_CPUS_PER_TASK "
                     f"{env.get('SLURM_CPUS_PER_TASK') or 'unset'}): torchrun, its {nproc} worker(s) and their data "
                     "loaders share it; submit with --cpus-per-task=N (the sbatch scripts pass it to srun) or "
                     "--exclusive.")
    if node_id == 0:
        notes.append(f"SLURM job {job} start: nodes={nnodes} ({env.get('SLURM_JOB_NODELIST', first)}) "
                     f"nproc_per_node={nproc} rendezvous={host}:{port} (first host {first}) "
                     f"restart={env.get('SLURM_RESTART_COUNT') or 0} deepspeed={ds}")
    return LaunchPlan([python, "-m", "torch.distributed.run", *flags, *ft], {**threads_env, **rdzv_env}, notes)
