"""Helpers of the integration tests: run the launch scripts, read their results.

Every process started here gets OMP_NUM_THREADS=1, CUDA_VISIBLE_DEVICES="" (CPU, so results
are comparable on any machine), loopback-only addresses and ports picked by binding
127.0.0.1. Logs of every launch are kept under the test's tmp dir and printed on failure.
"""
from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HOOKS = Path(__file__).resolve().parent / "_hooks"
LAUNCH = REPO / "launch"
DS_CONFIGS = REPO / "ds_configs"
TORCH_EXTENSIONS_DIR = os.environ.get(
    "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "qlaunch" / "torch_extensions"))

# Tiny, deterministic training: fixed seed, no dropout (its masks depend on how the batch
# is split), constant LR, no checkpoints. GLOBAL_BATCH samples per optimizer step.
MAX_STEPS = 4
GLOBAL_BATCH = 2
TINY = [
    "--max_steps", str(MAX_STEPS), "--model_max_length", "64", "--gradient_accumulation_steps", "1",
    "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0", "--learning_rate", "1e-3",
    "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--save_strategy", "no",
    "--logging_steps", "1", "--seed", "42", "--data_seed", "42", "--report_to", "none",
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra) -> dict:
    env = dict(os.environ)
    for k in list(env):  # nothing from an outer launcher or scheduler may leak in
        if k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_")) or k in (
            "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "NNODES", "NODE_RANK", "NPROC_PER_NODE", "GPUS_PER_NODE", "MAX_RESTARTS", "GROUP_RANK",
            "QLAUNCH_PRINT_ONLY", "QLAUNCH_ROOT", "PYTHONPATH", "QLAUNCH_TEST_DUMP_DIR",
        ):
            del env[k]
    bindir = str(Path(sys.executable).parent)
    env.update(
        PATH=f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}",
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TORCH_EXTENSIONS_DIR=TORCH_EXTENSIONS_DIR,
        GPTQMODEL_CPU_WORKERS="2",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


@dataclass
class Run:
    """One launch: its command, exit code, combined log and output directory."""
    cmd: list[str]
    out: Path
    log: Path
    returncode: int | None = None
    seconds: float = 0.0
    dump: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, n: int = 80) -> str:
        return "\n".join(self.text.splitlines()[-n:])

    def check(self) -> "Run":
        assert self.returncode == 0, f"{shlex.join(self.cmd)} exited {self.returncode}\n{self.tail()}"
        return self

    def run_info(self) -> dict:
        return json.loads((self.out / "run_info.json").read_text())

    def losses(self) -> list[float]:
        metrics = json.loads((self.out / "metrics.json").read_text())
        return [h["loss"] for h in metrics["loss_history"]]

    def adapter(self) -> dict:
        from safetensors.torch import load_file

        path = self.out / "adapter_model.safetensors"
        assert path.is_file() and path.stat().st_size > 0, f"no adapter in {self.out}\n{self.tail()}"
        return load_file(str(path))

    def rank_states(self) -> dict[int, dict]:
        import torch

        assert self.dump is not None
        files = sorted(self.dump.glob("rank*.pt"))
        assert files, f"no per-rank weight dumps in {self.dump}\n{self.tail()}"
        return {int(f.stem[4:]): torch.load(f, weights_only=True)["state"] for f in files}


def launch(script: str, args: list[str], out: Path, *, env: dict | None = None, timeout: float = 900,
           dump: bool = True, block_mpi4py: bool = False, cwd: Path | None = None, wait: bool = True,
           log: Path | None = None, dump_dir: Path | None = None, hooks: tuple[str, ...] = ()):
    """Run `bash launch/SCRIPT ARGS` (as a user would); return a Run (or (Run, Popen) with wait=False).

    Each rank's trainable weights are dumped to dump_dir (default OUT.ranks) by the test hook."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = Path(log or out.parent / f"{out.name}.log")
    env = dict(env or base_env())
    paths = [str(HOOKS / hook) for hook in hooks]  # test-only sitecustomize hooks, by directory name
    if block_mpi4py:
        paths.append(str(HOOKS / "no_mpi4py"))
    run = Run(cmd=["bash", str(LAUNCH / script), *args], out=out, log=log)
    if dump:
        run.dump = Path(dump_dir or out.parent / f"{out.name}.ranks")
        env["QLAUNCH_TEST_DUMP_DIR"] = str(run.dump)
        paths.append(str(HOOKS / "dump_weights"))
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    start = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.Popen(run.cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                cwd=str(cwd or out.parent), start_new_session=True)
    if not wait:
        run.extra["start"] = start
        return run, proc
    finish(run, proc, timeout, start)
    return run


def finish(run: Run, proc: subprocess.Popen, timeout: float, start: float | None = None) -> Run:
    """Wait for a launch; on timeout kill its process group (only what we started)."""
    start = run.extra.get("start", start) or time.monotonic()
    try:
        run.returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        run.returncode = -9
        pytest.fail(f"timed out after {timeout:.0f} s: {shlex.join(run.cmd)}\n{run.tail()}")
    run.seconds = time.monotonic() - start
    sys.stderr.write(f"[integration] {run.seconds:6.1f} s  rc={run.returncode}  {shlex.join(run.cmd)}\n")
    return run


def max_abs_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), f"different tensors: {sorted(set(a) ^ set(b))[:6]}"
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def deepspeed_available() -> str | None:
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"deepspeed not importable: {e}"
    return None
