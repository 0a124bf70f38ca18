"""`mpirun -np 2 python finetune.py …` (Open MPI, CPU processes, 127.0.0.1): no torchrun in between.

finetune.py takes its rank, world size and local rank from the MPI launcher's variables and agrees on
rank 0's address and port over MPI (mpi4py); the run must equal torchrun's DDP run with the same
arguments — plain DDP, DeepSpeed ZeRO-2 and FSDP2 alike (qlaunch/cluster/mpi.py, issue 22).
"""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from launchkit import GLOBAL_BATCH, HOOKS, REPO, TINY, Run, base_env, max_abs_diff
from test_deepspeed import deepspeed_ops  # noqa: F401  (fixture: DeepSpeed's CPU ops, built once)
from test_torchrun import assert_ranks_identical

pytestmark = [pytest.mark.integration]

MPIRUN = shutil.which("mpirun")


@pytest.fixture(scope="module")
def mpi():
    if MPIRUN is None:
        pytest.skip("needs an MPI launcher (Open MPI: apt install openmpi-bin)")
    pytest.importorskip("mpi4py", reason="MPI runs agree on rank 0's address through mpi4py: pip install 'qlaunch[mpi]'")
    version = subprocess.run([MPIRUN, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" not in version:
        pytest.skip(f"these commands are Open MPI's; found: {version.splitlines()[:1]}")


def mpirun(work, launch_demo, *extra: str) -> tuple[Run, str]:
    out, dump = work / "out", work / "ranks"
    env = base_env(PYTHONPATH=HOOKS / "dump_weights", QLAUNCH_TEST_DUMP_DIR=dump,
                   OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")  # CI containers run as root
    ft = [sys.executable, str(REPO / "finetune.py"), "--config", str(REPO / "recipes" / "lora-default.yaml"),
          "--model_name_or_path", str(launch_demo["model"]), "--data_path", str(launch_demo["data"]),
          "--use_lora", "True", "--q_lora", "False", "--output_dir", str(out), *TINY,
          "--per_device_train_batch_size", str(GLOBAL_BATCH // 2), *extra]
    r = subprocess.run([MPIRUN, "-np", "2", "--oversubscribe", *ft], env=env, cwd=str(work), capture_output=True,
                       text=True, timeout=900)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-6000:]
    return Run(cmd=["mpirun"], out=out, log=work / "none", returncode=0, dump=dump), log


def test_plain_mpirun_equals_torchrun(mpi, launch_demo, runs_dir, ddp_run):
    work = runs_dir / "mpi_ddp"
    work.mkdir()
    run, log = mpirun(work, launch_demo)
    assert "MPI process without a launcher: RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 LOCAL_WORLD_SIZE=2 " \
           "MASTER_ADDR=127.0.0.1" in log, log[-3000:]
    assert run.run_info()["world_size"] == 2 and run.run_info()["deepspeed"] is False
    assert_ranks_identical(run, 2)
    diff = max_abs_diff(run.adapter(), ddp_run.adapter())
    print(f"mpirun 2 processes vs torchrun DDP: max |adapter diff| = {diff:.3g}")
    assert diff <= 1e-6
    assert run.losses() == pytest.approx(ddp_run.losses(), rel=1e-5)


@pytest.mark.parametrize("engine", ["zero2", "fsdp2"])
def test_mpirun_with_a_sharding_engine_equals_torchrun(mpi, launch_demo, runs_dir, ddp_run, deepspeed_ops, engine):
    work = runs_dir / f"mpi_{engine}"
    work.mkdir()
    flags = (["--deepspeed", str(REPO / "ds_configs" / "zero2.json")] if engine == "zero2"
             else ["--fsdp_config", str(REPO / "fsdp_configs" / "fsdp2.json")])
    run, log = mpirun(work, launch_demo, *flags)
    info = run.run_info()
    assert info["world_size"] == 2 and info["engine"] == {"zero2": "ZeRO-2", "fsdp2": "FSDP2"}[engine], info
    # torch's variables were set before DeepSpeed looked: it skips its own MPI discovery (hostname -I)
    assert "MPI process without a launcher: RANK=0 WORLD_SIZE=2" in log, log[-3000:]
    assert_ranks_identical(run, 2)
    diff = max_abs_diff(run.adapter(), ddp_run.adapter())
    print(f"mpirun 2 processes {engine} vs torchrun DDP: max |adapter diff| = {diff:.3g}")
    assert diff <= 1e-4  # ZeRO-2 and FSDP2 reduce in their own buckets (the engines' tests' bound)
