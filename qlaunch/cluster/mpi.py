"""Runs started by an MPI launcher: `mpirun -np N python finetune.py …` (Open MPI, MPICH / Hydra, Intel MPI,
PMIx), one process per GPU, no torchrun in between.

torch.distributed reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; MPI launchers set
their own variables instead. `mpi_rank_env` maps them (a pure function, tested per implementation);
the rendezvous address is agreed through MPI itself (mpi4py: rank 0 broadcasts its address and a port
it found free), unless MASTER_ADDR and MASTER_PORT were passed in (`mpirun -x MASTER_ADDR -x MASTER_PORT`).
DeepSpeed has an mpi4py discovery of its own, but only for DeepSpeed runs, and it takes rank 0's
address from `hostname -I`; this serves every engine the same way.
"""
from __future__ import annotations

from qlaunch.config.environment import LAUNCHER_VARIABLES

# (rank, world size, local rank, local size) variables of each MPI family, in the order they are tried
MPI_FAMILIES = {
    "Open MPI": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                 "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "MPICH / Intel MPI (Hydra, PMI)": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    "PMIx": ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE"),
}


def mpi_family(env) -> str | None:
    """Which MPI launcher started this process, from its variables; None outside MPI."""
    for family, names in MPI_FAMILIES.items():
        if any(name in env for name in names[:2]):
            return family
    return None


def mpi_rank_env(env) -> tuple[dict, str | None]:
    """(the rank variables torch reads, a problem) for a process an MPI launcher started; ({}, None) outside
    MPI or when a launcher already set torch's variables. The rendezvous address is not included."""
    family = mpi_family(env)
    if family is None or any(name in env for name in LAUNCHER_VARIABLES):
        return {}, None
    rank_name, size_name, local_name, local_size_name = MPI_FAMILIES[family]
    values = {}
    for name in (rank_name, size_name, local_name, local_size_name):
        text = env.get(name)
        if text is not None and not text.isdigit():
            return {}, f"{name}={text!r}: {family} set a rank variable that is not a whole number."
        values[name] = int(text) if text is not None else None
    rank, size = values[rank_name], values[size_name]
    if rank is None or size is None:
        missing = rank_name if rank is None else size_name
        return {}, (f"{family}: {missing} is not set (only part of the launcher's environment reached this "
                    "process); start it with mpirun/mpiexec, or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR "
                    "and MASTER_PORT yourself.")
    if size < 1 or rank >= size:
        return {}, f"{family}: rank {rank} of a world of {size} processes is impossible."
    local_rank, local_size = values[local_name], values[local_size_name]
    if size == 1:
        local_rank, local_size = 0, 1
    if local_rank is None or local_size is None:  # which GPU is this process's? guessing could share one
        missing = local_name if local_rank is None else local_size_name
        return {}, (f"{family}: {missing} is not set, so this process cannot tell which of its node's GPUs is "
                    "its own; start it with mpirun/mpiexec, or set LOCAL_RANK and LOCAL_WORLD_SIZE yourself.")
    if local_rank >= local_size:
        return {}, f"{family}: local rank {local_rank} of {local_size} processes on the node is impossible."
    return {"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(local_size)}, None


def single_node(rank_env: dict) -> bool:
    return rank_env.get("LOCAL_WORLD_SIZE") == rank_env.get("WORLD_SIZE")


def given_endpoint(env) -> tuple[str, int] | None:
    """MASTER_ADDR and MASTER_PORT passed in by the user (`mpirun -x MASTER_ADDR -x MASTER_PORT …`)."""
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT", "").isdigit():
        return env["MASTER_ADDR"], int(env["MASTER_PORT"])
    return None


def own_address() -> str:
    """This host's address on the network, not loopback (Debian maps the hostname to 127.0.1.1): the first
    non-loopback IPv4 address the hostname resolves to, else the hostname. MASTER_ADDR overrides it."""
    import socket

    host = socket.gethostname()
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET)
    except OSError:
        return host
    return next((info[4][0] for info in infos if not info[4][0].startswith("127.")), host)


def agree_on_rank0(rank_env: dict, free_port) -> tuple[str, int]:
    """Rank 0's address and a port free there, broadcast over MPI (collective over MPI_COMM_WORLD). On one
    node, loopback."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    endpoint = None
    if comm.Get_rank() == 0:
        addr = "127.0.0.1" if single_node(rank_env) else own_address()
        endpoint = (addr, free_port("127.0.0.1" if addr == "127.0.0.1" else "0.0.0.0"))
    return comm.bcast(endpoint, root=0)


def cpu_threads(env, local_size: int, cpus: int) -> int | None:
    """Threads for each of the node's processes (its CPUs split between them); None when OMP_NUM_THREADS
    is set (the user's choice stands)."""
    if env.get("OMP_NUM_THREADS"):
        return None
    return max(cpus // max(local_size, 1), 1)
