"""Ranks agree on control flags (preemption, failed checks) over a CPU process group: with NCCL as the
default backend a separate gloo group of the same ranks, so reading the agreed flags never waits for the
GPU (qlaunch.train.callbacks.control_group_backend / control_group / any_ranks)."""
from __future__ import annotations

import os
import socket

import pytest
import torch.multiprocessing as mp

from qlaunch.train.callbacks import any_ranks, control_group_backend


@pytest.mark.parametrize("backend, expected", [
    ("nccl", "gloo"),                # GPUs: a CPU group beside NCCL's
    ("xccl", "gloo"),                # Intel GPUs
    ("gloo", None),                  # CPU worlds: the default group carries CPU tensors
    ("cpu:gloo,cuda:nccl", None),    # torch's paired default: CPU tensors go to gloo
    ("mpi", None),
])
def test_control_group_backend(backend, expected):
    assert control_group_backend(backend) == expected


def _rank(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from qlaunch.train import callbacks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # GPU facts: the default group is "nccl", so the flags go through a new gloo group
        first = any_ranks([rank == 1, False], backend="nccl")
        group = callbacks.control_group("nccl")
        second = any_ranks([False, rank == 0], backend="nccl")
        results.put((rank, first, second, group is not None, len(callbacks._CONTROL_GROUPS),
                     dist.get_world_size(group)))
    finally:
        dist.destroy_process_group()


def test_two_ranks_agree_over_a_separate_cpu_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, first, second, separate, groups, size in got:
        assert first == [True, False] and second == [False, True], got  # each rank's flag reached the other
        assert separate and groups == 1 and size == 2, got  # one new group of both ranks, created once
