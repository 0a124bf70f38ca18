"""Shared fixtures of the integration tests: the demo model (built once with
`python -m qlaunch.demo`), and the reference runs several tests compare against.
Helpers live in launchkit.py; the local SLURM in slurm_cluster.py.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from launchkit import GLOBAL_BATCH, REPO, TINY, Run, base_env, launch


# ---- session fixtures ------------------------------------------------------------
@pytest.fixture(scope="session")
def launch_demo(tmp_path_factory) -> dict:
    """The deterministic tiny demo model + data, built once: {'dir', 'model', 'data'}."""
    d = tmp_path_factory.mktemp("demo")
    r = subprocess.run([sys.executable, "-m", "qlaunch.demo", "--out", str(d)], env=base_env(), cwd=str(REPO),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"qlaunch.demo failed:\n{r.stdout}\n{r.stderr}"
    model, data = d / "model", d / "data" / "train.json"
    assert model.is_dir() and data.is_file()
    return {"dir": d, "model": model, "data": data}


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def single_run(launch_demo, runs_dir) -> Run:
    """Reference: one process, LoRA, batch GLOBAL_BATCH (lora_single_gpu.sh, plain python)."""
    return launch("lora_single_gpu.sh", ["-m", str(launch_demo["model"]), "-d", str(launch_demo["data"]),
                                         "-o", str(runs_dir / "single"), "--", *TINY,
                                         "--per_device_train_batch_size", str(GLOBAL_BATCH)],
                  runs_dir / "single").check()


@pytest.fixture(scope="session")
def ddp_run(launch_demo, runs_dir) -> Run:
    """torchrun, 2 CPU processes, DDP (no DeepSpeed), batch 1 each = the same global batch."""
    env = base_env(NPROC_PER_NODE=2)
    return launch("lora_ds.sh", ["--deepspeed", "none", "-m", str(launch_demo["model"]), "-d", str(launch_demo["data"]),
                                 "-o", str(runs_dir / "ddp"), "--", *TINY,
                                 "--per_device_train_batch_size", str(GLOBAL_BATCH // 2)],
                  runs_dir / "ddp", env=env).check()
