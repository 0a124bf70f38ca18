"""The rank variables of a process an MPI launcher started, from each implementation's own (pure)."""
from __future__ import annotations

import os

import pytest

from qlaunch.cluster.mpi import cpu_threads, given_endpoint, mpi_family, mpi_rank_env, single_node

# what each launcher sets for rank 3 of 8, the second of 4 processes on its node
OPEN_MPI = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "PMIX_RANK": "3"}  # Open MPI 4 sets PMIx's rank too
HYDRA = {"PMI_RANK": "3", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4"}  # MPICH, Intel MPI
PMIX = {"PMIX_RANK": "3", "PMIX_SIZE": "8", "PMIX_LOCAL_RANK": "1", "PMIX_LOCAL_SIZE": "4"}
EXPECTED = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}


@pytest.mark.parametrize("env, family", [(OPEN_MPI, "Open MPI"), (HYDRA, "MPICH / Intel MPI (Hydra, PMI)"),
                                         (PMIX, "PMIx")])
def test_each_mpi_family_maps_to_torch_s_rank_variables(env, family):
    assert mpi_family(env) == family
    assert mpi_rank_env(env) == (EXPECTED, None)
    assert not single_node(EXPECTED) and single_node({**EXPECTED, "LOCAL_WORLD_SIZE": "8"})


def test_outside_mpi_or_under_another_launcher_nothing_is_set():
    assert mpi_rank_env({}) == ({}, None) and mpi_family({"SLURM_PROCID": "0"}) is None
    # torchrun started under mpirun (one agent per node): torchrun's variables stand
    assert mpi_rank_env({**OPEN_MPI, "RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1"}) == ({}, None)


@pytest.mark.parametrize("env, words", [
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_RANK is not set"),  # a world size but no rank
    ({"PMI_RANK": "1"}, "PMI_SIZE is not set"),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "2"}, "rank 2 of a world of 2 processes is impossible"),
    ({"PMI_RANK": "x", "PMI_SIZE": "2"}, "PMI_RANK='x': MPICH / Intel MPI (Hydra, PMI) set a rank variable"),
    ({**HYDRA, "MPI_LOCALRANKID": "4"}, "local rank 4 of 4 processes on the node is impossible"),
])
def test_partial_or_impossible_mpi_environments_are_one_problem(env, words):
    added, problem = mpi_rank_env(env)
    assert added == {} and words in problem


def test_without_a_local_rank_a_process_cannot_pick_its_gpu_and_is_refused():
    added, problem = mpi_rank_env({"PMI_RANK": "1", "PMI_SIZE": "2"})
    assert added == {} and "MPI_LOCALRANKID is not set, so this process cannot tell" in problem
    # one process needs no local rank
    assert mpi_rank_env({"PMI_RANK": "0", "PMI_SIZE": "1"})[0] == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                                                                   "LOCAL_WORLD_SIZE": "1"}


def test_the_user_s_rendezvous_and_threads_stand():
    assert given_endpoint({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}) == ("10.0.0.1", 29500)
    assert given_endpoint({"MASTER_ADDR": "10.0.0.1"}) is None  # no port: rank 0 picks one and tells the others
    assert cpu_threads({}, local_size=4, cpus=64) == 16 and cpu_threads({}, local_size=8, cpus=4) == 1
    assert cpu_threads({"OMP_NUM_THREADS": "2"}, local_size=4, cpus=64) is None


@pytest.mark.parametrize("env", [{"OMPI_COMM_WORLD_SIZE": "2"}, {"PMI_RANK": "0", "PMI_SIZE": "0"}])
def test_finetune_refuses_a_partial_mpi_environment_before_anything_loads(env, demo, tmp_path, capsys, monkeypatch):
    from qlaunch.cli import main

    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")} | env)
    with pytest.raises(SystemExit) as exit_info:
        main(["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir", str(tmp_path / "o"),
              "--use_lora"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("finetune.py: error:") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()
