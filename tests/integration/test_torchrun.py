"""torchrun through the launch scripts: 2 CPU processes, and two simulated nodes, on 127.0.0.1.

Each multi-process run must (1) really form one world of size 2 (without use_cpu/gloo the
workers silently train two world-size-1 copies), (2) end with identical weights on every
rank, (3) reproduce the single-process run with the same global batch.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from launchkit import GLOBAL_BATCH, MAX_STEPS, REPO, TINY, base_env, finish, free_port, launch, max_abs_diff

pytestmark = [pytest.mark.integration, pytest.mark.torchrun]

LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-4


def assert_ranks_identical(run, world_size: int) -> None:
    states = run.rank_states()
    assert sorted(states) == list(range(world_size)), f"rank dumps: {sorted(states)}\n{run.tail()}"
    for r in range(1, world_size):
        diff = max_abs_diff(states[0], states[r])
        assert diff == 0.0, f"rank {r} differs from rank 0 by {diff}"


def assert_matches(run, ref, what: str) -> float:
    np.testing.assert_allclose(run.losses(), ref.losses(), rtol=LOSS_RTOL, err_msg=f"{what}: losses")
    diff = max_abs_diff(run.adapter(), ref.adapter())
    print(f"{what}: max |adapter diff| = {diff:.3g}; losses {run.losses()} vs {ref.losses()}")
    assert diff <= WEIGHT_ATOL, f"{what}: adapter differs by {diff}"
    return diff


def test_single_process_reference(single_run):
    info = single_run.run_info()
    assert info["world_size"] == 1 and info["deepspeed"] is False
    assert len(single_run.losses()) == MAX_STEPS
    assert_ranks_identical(single_run, 1)


def test_rerun_is_bitwise_reproducible(launch_demo, runs_dir, single_run):
    """The same command twice gives the same adapter: a precondition of every comparison here.
    (Fails if finetune.py does not seed before the LoRA weights are initialised.)"""
    again = launch("lora_single_gpu.sh", ["-m", str(launch_demo["model"]), "-d", str(launch_demo["data"]),
                                          "-o", str(runs_dir / "single_again"), "--", *TINY,
                                          "--per_device_train_batch_size", str(GLOBAL_BATCH)],
                   runs_dir / "single_again").check()
    diff = max_abs_diff(again.adapter(), single_run.adapter())
    assert diff == 0.0, f"rerun differs by {diff}: is the seed set before get_peft_model?"
    assert again.losses() == single_run.losses()


def test_torchrun_two_processes(ddp_run, single_run):
    info = ddp_run.run_info()
    assert info["world_size"] == 2, info
    assert info["ddp_backend"] == "gloo" and info["device"].startswith("cpu")
    assert info["global_batch_size"] == GLOBAL_BATCH
    assert "World size 2" in ddp_run.text
    assert "torch.distributed.run" in ddp_run.text  # the printed command
    assert_ranks_identical(ddp_run, 2)
    assert_matches(ddp_run, single_run, "torchrun 2 procs vs 1 proc")
    # each rank's startup, gathered once at the first step (RunClock): two values, within the launch's time
    startup = json.loads((ddp_run.out / "metrics.json").read_text())["startup_seconds_per_rank"]
    assert len(startup) == 2 and all(0 < s < ddp_run.seconds for s in startup), (startup, ddp_run.seconds)
    assert "First training step" in ddp_run.text and "slowest" in ddp_run.text


def test_torchrun_labelled_logits_equal_the_full_logits_path(launch_demo, runs_dir):
    """2 processes x gradient accumulation 2: logits only at labelled positions (the default) give
    the losses and adapter of transformers' full-logits path (token averaging across ranks and
    accumulation steps untouched)."""
    runs = {}
    for flag in ("True", "False"):
        out = runs_dir / f"ddp_ga_labelled_{flag}"
        runs[flag] = launch("lora_ds.sh", ["--deepspeed", "none", "-m", str(launch_demo["model"]),
                                           "-d", str(launch_demo["data"]), "-o", str(out), "--", *TINY,
                                           "--per_device_train_batch_size", "2", "--gradient_accumulation_steps",
                                           "2", "--labelled_logits_only", flag],
                            out, env=base_env(NPROC_PER_NODE=2)).check()
    assert runs["True"].run_info()["world_size"] == 2
    assert "Logits at every position" not in runs["True"].text
    assert_ranks_identical(runs["True"], 2)
    assert_matches(runs["True"], runs["False"], "labelled logits vs full logits, 2 procs x GA 2")


def launch_two_nodes(launch_demo, runs_dir, name: str, **env_extra) -> list:
    """Two launches of lora_ds.sh, NNODES=2 NODE_RANK=0|1, one process each, on MASTER_ADDR=127.0.0.1
    — what a user runs on each of two machines. Returns both finished runs, checked."""
    port = free_port()
    out = runs_dir / name
    procs = []
    for node_rank in (0, 1):
        env = base_env(NNODES=2, NODE_RANK=node_rank, NPROC_PER_NODE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                       **env_extra)
        run, proc = launch("lora_ds.sh", ["--deepspeed", "none", "-m", str(launch_demo["model"]),
                                          "-d", str(launch_demo["data"]), "-o", str(out), "--", *TINY,
                                          "--per_device_train_batch_size", str(GLOBAL_BATCH // 2)],
                           out, env=env, wait=False, log=runs_dir / f"{name}.node{node_rank}.log")
        procs.append((run, proc))
    runs = [finish(run, proc, timeout=600) for run, proc in procs]
    for run in runs:
        run.check()
    return runs


def test_two_simulated_nodes(launch_demo, runs_dir, single_run):
    """Static rendezvous across two simulated nodes."""
    runs = launch_two_nodes(launch_demo, runs_dir, "two_nodes")
    for run in runs:
        assert "--nnodes=2" in run.text
    assert "--node_rank=0" in runs[0].text and "--node_rank=1" in runs[1].text
    info = runs[0].run_info()
    assert info["world_size"] == 2, info
    assert_ranks_identical(runs[0], 2)
    assert_matches(runs[0], single_run, "2 nodes x 1 proc vs 1 proc")


def test_c10d_rendezvous_two_simulated_nodes(launch_demo, runs_dir, ddp_run):
    """MAX_RESTARTS>0 switches to c10d rendezvous (static rendezvous hangs on restart)."""
    runs = launch_two_nodes(launch_demo, runs_dir, "c10d", MAX_RESTARTS=1, RDZV_ID="qlaunch-test-c10d")
    for run in runs:
        assert "--rdzv_backend=c10d" in run.text and "--max_restarts=1" in run.text
    assert runs[0].run_info()["world_size"] == 2
    assert_ranks_identical(runs[0], 2)
    assert_matches(runs[0], ddp_run, "c10d 2 nodes vs static torchrun")


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def rank1_worker_after(run, proc, steps: int, at_step: int, also=lambda: True, timeout: float = 300):
    """The PID of torchrun's LOCAL_RANK=1 worker once the log shows at_step of steps (and also())."""
    import re
    import time

    progress = re.compile(rf"\b(\d+)/{steps} \[")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        done = [int(m) for m in progress.findall(run.text)]
        if done and max(done) >= at_step and also():
            # proc is torchrun itself (the script execs it); its children are the workers.
            victim = next((c for c in _children(proc.pid) if _local_rank(c) == "1"), None)
            if victim:
                return victim
        time.sleep(0.3)
    return None


def _local_rank(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        return env.get(b"LOCAL_RANK", b"").decode() or None
    except OSError:
        return None


@pytest.mark.slow
def test_max_restarts_c10d_restarts_a_killed_worker_and_resumes(launch_demo, runs_dir):
    """MAX_RESTARTS=1 → c10d rendezvous: after a worker is killed, torchrun restarts the group
    and finetune.py resumes from the last checkpoint (static rendezvous would hang here)."""
    import os
    import re
    import signal

    steps = 200
    out = runs_dir / "restart"
    args = list(TINY)
    args[args.index("--max_steps") + 1] = str(steps)
    args[args.index("--save_strategy") + 1] = "steps"
    env = base_env(NPROC_PER_NODE=2, MAX_RESTARTS=1)
    run, proc = launch("lora_ds.sh", ["--deepspeed", "none", "-m", str(launch_demo["model"]),
                                      "-d", str(launch_demo["data"]), "-o", str(out), "--", *args,
                                      "--per_device_train_batch_size", "1", "--save_steps", "20",
                                      "--logging_steps", "10",  # no --resume_from_checkpoint: a restart resumes by itself
                                      "--ddp_timeout", "180"],  # a re-rendezvous hang fails in minutes
                       out, env=env, wait=False)
    victim = rank1_worker_after(run, proc, steps, 30, lambda: (out / "checkpoint-20").is_dir())
    assert victim, f"no worker to kill (training did not reach step 30?)\n{run.tail()}"
    os.kill(victim, signal.SIGKILL)
    finish(run, proc, timeout=600).check()
    assert "--rdzv_backend=c10d" in run.text and "--max_restarts=1" in run.text
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" in (REPO / "qlaunch" / "cluster" / "rendezvous.py").read_text()
    assert re.search(r"Resuming from .*checkpoint-\d+", run.text), run.tail()
    assert "Elastic restart 1: resuming from the newest checkpoint" in run.text, run.tail()
    info = run.run_info()
    assert info["world_size"] == 2
    assert_ranks_identical(run, 2)
    metrics = (out / "metrics.json").read_text()
    assert f'"step": {steps}' in metrics


@pytest.mark.slow
def test_sigusr1_to_one_rank_stops_every_rank_at_the_same_step(launch_demo, runs_dir):
    """SLURM's warning signal reaches ranks at different times; here only rank 1 gets it. The ranks
    agree at each step end, so both checkpoint the same step and exit 0 (no collective hang)."""
    import os
    import re
    import signal

    steps = 300
    out = runs_dir / "preempt_one_rank"
    args = list(TINY)
    args[args.index("--max_steps") + 1] = str(steps)
    run, proc = launch("lora_ds.sh", ["--deepspeed", "none", "-m", str(launch_demo["model"]),
                                      "-d", str(launch_demo["data"]), "-o", str(out), "--", *args,
                                      "--per_device_train_batch_size", "1", "--logging_steps", "10",
                                      "--ddp_timeout", "120"],  # a desynchronised save would fail, not hang
                       out, env=base_env(NPROC_PER_NODE=2), wait=False)
    victim = rank1_worker_after(run, proc, steps, 5)
    assert victim, f"no rank-1 worker found\n{run.tail()}"
    os.kill(victim, signal.SIGUSR1)
    finish(run, proc, timeout=300).check()
    stops = re.findall(r"Stopped by (.+?) at step (\d+)", run.text)
    assert sorted(reason for reason, _ in stops) == ["SIGUSR1", "a signal to another rank"], stops
    assert len({at for _, at in stops}) == 1, stops  # the same step on both ranks
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1, checkpoints
    step = int(checkpoints[0].name.split("-")[1])
    assert 0 < step < steps
    assert (checkpoints[0] / "adapter_model.safetensors").is_file()
    # Both ranks saved their RNG state for the same step: the checkpoint is complete.
    assert sorted(p.name for p in checkpoints[0].glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert not (out / "adapter_model.safetensors").exists()  # stopped, not finished
