"""Crash consistency: kill -9 a run at random steps after its first checkpoint, or in the middle of
writing a checkpoint; `--resume_from_checkpoint auto` then finishes with the same adapter as an
uninterrupted run (1 process and 2-process torchrun, dropout 0)."""
from __future__ import annotations

import os
import random
import re
import signal
import time

import pytest
from launchkit import TINY, base_env, launch, max_abs_diff

pytestmark = [pytest.mark.integration, pytest.mark.torchrun, pytest.mark.slow]

STEPS, SAVE = 24, 4
SEED = int(os.environ.get("QLAUNCH_CRASH_SEED", time.time_ns() % 10_000))


def crash_args(launch_demo, out, batch) -> list[str]:
    args = list(TINY)
    args[args.index("--max_steps") + 1] = str(STEPS)
    args[args.index("--save_strategy") + 1] = "steps"
    return ["--deepspeed", "none", "-m", str(launch_demo["model"]), "-d", str(launch_demo["data"]), "-o", str(out),
            "--", *args, "--save_steps", str(SAVE), "--per_device_train_batch_size", str(batch),
            "--resume_from_checkpoint", "auto", "--ddp_timeout", "120"]


def run_to_end(launch_demo, out, nproc, **env):
    return launch("lora_ds.sh", crash_args(launch_demo, out, 2 // nproc), out,
                  env=base_env(NPROC_PER_NODE=nproc, **env), dump=False)


def descendants(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        return []
    return children + [d for c in children for d in descendants(c)]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie is dead, only not yet reaped
    except OSError:
        return False


def kill_when(run, proc, ready, timeout=300) -> None:
    """SIGKILL the launch and every process under it (torchrun starts its workers in their own
    sessions, so killing the process group alone would leave them training) once ready() is true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready(run.text):
            tree = descendants(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)
            for pid in tree:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
            while any(alive(pid) for pid in tree):
                time.sleep(0.05)
            return
        time.sleep(0.1)
    pytest.fail(f"the run never reached the kill point\n{run.tail()}")


@pytest.fixture(scope="module", params=[1, 2], ids=["1proc", "2proc"])
def reference(request, launch_demo, runs_dir):
    nproc = request.param
    run = run_to_end(launch_demo, runs_dir / f"crash_ref_{nproc}", nproc).check()
    return nproc, run


def test_kill_at_a_random_step_then_resume_equals_uninterrupted(reference, launch_demo, runs_dir):
    """One random kill per process count and run: SEED changes every run (printed; QLAUNCH_CRASH_SEED
    replays one), so the kill points are sampled across CI runs rather than twice within one (~46 s each)."""
    nproc, ref = reference
    # Progress is read from the checkpoints on disk (the log of torchrun's workers lags): kill a
    # random time after a random checkpoint, while the steps after it run.
    rng = random.Random(SEED * 10 + nproc)
    after, delay = SAVE * rng.randint(1, STEPS // SAVE - 2), rng.uniform(0.0, 1.0)
    print(f"seed {SEED}: killing the {nproc}-process run {delay:.2f} s after checkpoint-{after}")
    out = runs_dir / f"crash_{nproc}"
    run, proc = launch("lora_ds.sh", crash_args(launch_demo, out, 2 // nproc), out, dump_dir=out.parent / "unused",
                       env=base_env(NPROC_PER_NODE=nproc, QLAUNCH_TEST_STEP_SLEEP=0.15), wait=False)
    seen = {}

    def ready(_text):
        if (out / f"checkpoint-{after}").is_dir():
            seen.setdefault("at", time.monotonic())
            return time.monotonic() - seen["at"] >= delay
        return False

    kill_when(run, proc, ready)
    done = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert done and max(done) < STEPS, f"killed too late to test anything: {done}"
    assert not (out / "adapter_model.safetensors").exists()
    resumed = run_to_end(launch_demo, out, nproc).check()
    assert re.search(r"Resuming from .*checkpoint-\d+", resumed.text), resumed.tail()
    diff = max_abs_diff(resumed.adapter(), ref.adapter())
    print(f"killed after checkpoint-{max(done)}, resumed: max |adapter diff| vs uninterrupted = {diff:.3g}")
    assert diff <= 1e-6


def test_kill_during_a_checkpoint_write_skips_the_partial_one(reference, launch_demo, runs_dir):
    nproc, ref = reference
    out = runs_dir / f"crash_in_save_{nproc}"
    run, proc = launch("lora_ds.sh", crash_args(launch_demo, out, 2 // nproc), out, dump_dir=out.parent / "unused",
                       env=base_env(NPROC_PER_NODE=nproc, QLAUNCH_TEST_SLOW_SAVE=f"{2 * SAVE}:60"), wait=False)
    # The second checkpoint (step 8) is half-written when the run dies.
    kill_when(run, proc, lambda text: "QLAUNCH_TEST: writing" in text)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{SAVE}"]  # only complete ones
    assert (out / ".staging" / f"checkpoint-{2 * SAVE}").is_dir()  # the partial one, under its temporary name
    resumed = run_to_end(launch_demo, out, nproc).check()
    assert f"Skipping {out / '.staging' / f'checkpoint-{2 * SAVE}'}" in resumed.text, resumed.tail()
    assert re.search(rf"Resuming from .*checkpoint-{SAVE}\b", resumed.text), resumed.tail()
    assert max_abs_diff(resumed.adapter(), ref.adapter()) <= 1e-6
    assert not (out / ".staging").exists()
