"""sbatch launch/*_slurm.sbatch on a real single-host SLURM (munge + slurmctld + slurmd on
127.0.0.1, started by slurm_cluster.py), 2 CPU processes on the one node."""
from __future__ import annotations

import re
import time

import pytest
from launchkit import GLOBAL_BATCH, HOOKS, LAUNCH, TINY, Run, base_env, max_abs_diff
from slurm_cluster import SlurmCluster, unavailable_reason, wait_job
from test_torchrun import assert_ranks_identical

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.torchrun]

STAMP = r"\[qlaunch \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\]"


@pytest.fixture(scope="module")
def slurm():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with SlurmCluster() as cluster:
        yield cluster


def sbatch(cluster: SlurmCluster, script: str, args: list[str], workdir, dump_dir, **env) -> str:
    job_env = cluster.env(base_env(PYTHONPATH=HOOKS / "dump_weights", QLAUNCH_TEST_DUMP_DIR=dump_dir, **env))
    r = cluster.run("sbatch", "--parsable", f"--chdir={workdir}", f"--output={workdir}/slurm-%j.out",
                    str(LAUNCH / script), *args, env=job_env, check=False)
    assert r.returncode == 0, f"sbatch failed: {r.stdout}\n{r.stderr}\n{cluster.logs()}"
    return r.stdout.strip().split(";")[0]


def test_sbatch_two_processes(slurm, launch_demo, runs_dir, ddp_run):
    work = runs_dir / "slurm"
    work.mkdir()
    out, dump = work / "out", work / "ranks"
    start = time.monotonic()
    job = sbatch(slurm, "lora_slurm.sbatch",
                 ["-m", str(launch_demo["model"]), "-d", str(launch_demo["data"]), "-o", str(out), "--", *TINY,
                  "--per_device_train_batch_size", str(GLOBAL_BATCH // 2)],
                 work, dump, NPROC_PER_NODE=2,
                 # stale values from the submitting shell must not be used inside the allocation
                 MASTER_ADDR="stale.invalid", MASTER_PORT=1, NNODES=7)
    state = wait_job(slurm, job, timeout=600)
    log = (work / f"slurm-{job}.out").read_text(errors="replace")
    print(f"SLURM job {job}: {state} after {time.monotonic() - start:.1f} s")
    assert state == "COMPLETED", f"job {job} {state}\n{log[-6000:]}\n{slurm.logs()}"
    assert re.search(STAMP + rf" SLURM job {job} start: nodes=1 \(qlnode\) nproc_per_node=2 "
                     r"rendezvous=127\.0\.0\.1:\d+", log), log[-3000:]
    assert re.search(STAMP + rf" SLURM job {job} end: exit 0 after \d+ s", log), log[-3000:]
    assert "--rdzv_backend=c10d" in log and f"--rdzv_id={job}" in log and "srun" in log

    run = Run(cmd=["sbatch"], out=out, log=work / f"slurm-{job}.out", returncode=0, dump=dump)
    info = run.run_info()
    assert info["world_size"] == 2, info
    assert_ranks_identical(run, 2)
    diff = max_abs_diff(run.adapter(), ddp_run.adapter())
    print(f"SLURM 2 procs vs torchrun DDP: max |adapter diff| = {diff:.3g}")
    assert diff <= 1e-6
    assert run.losses() == pytest.approx(ddp_run.losses(), rel=1e-5)


def test_plain_srun_one_task_per_process_without_torchrun(slurm, launch_demo, runs_dir, ddp_run):
    """srun --ntasks=2 python finetune.py (what sites that start one task per GPU do): finetune.py takes
    its rank, world size and rank 0's address from SLURM's variables; the result equals torchrun's DDP run
    with the same arguments (issue 22)."""
    import sys

    from launchkit import REPO

    work = runs_dir / "srun_tasks"
    work.mkdir()
    out, dump = work / "out", work / "ranks"
    env = slurm.env(base_env(PYTHONPATH=HOOKS / "dump_weights", QLAUNCH_TEST_DUMP_DIR=dump))
    ft = [sys.executable, str(REPO / "finetune.py"), "--config", str(REPO / "recipes" / "lora-default.yaml"),
          "--model_name_or_path", str(launch_demo["model"]), "--data_path", str(launch_demo["data"]),
          "--use_lora", "True", "--q_lora", "False", "--output_dir", str(out), *TINY,
          "--per_device_train_batch_size", str(GLOBAL_BATCH // 2)]
    r = slurm.run("srun", "--ntasks=2", "--cpus-per-task=1", f"--chdir={work}", *ft, env=env, timeout=600,
                  check=False)
    log = r.stdout + r.stderr
    assert r.returncode == 0, f"{log[-6000:]}\n{slurm.logs()}"
    assert "srun task without a launcher: RANK=0 WORLD_SIZE=2 LOCAL_RANK=0" in log, log[-3000:]
    run = Run(cmd=["srun"], out=out, log=work / "none", returncode=0, dump=dump)
    assert run.run_info()["world_size"] == 2
    assert_ranks_identical(run, 2)
    diff = max_abs_diff(run.adapter(), ddp_run.adapter())
    print(f"srun 2 tasks vs torchrun DDP: max |adapter diff| = {diff:.3g}")
    assert diff <= 1e-6


def test_sbatch_help_and_bad_flag_outside_slurm():
    import subprocess

    for script in ("qlora_slurm.sbatch", "lora_slurm.sbatch"):
        r = subprocess.run(["bash", str(LAUNCH / script), "-h"], capture_output=True, text=True, env=base_env())
        assert r.returncode == 0 and "sbatch" in r.stdout
        r = subprocess.run(["bash", str(LAUNCH / script), "-m", "m", "-d", "d"], capture_output=True, text=True,
                           env=base_env())
        assert r.returncode == 2 and "not inside a SLURM job" in r.stderr


def tiny_for(steps: int) -> list[str]:
    """The tiny run's flags with more steps: long enough to be signalled while it trains."""
    args = list(TINY)
    args[args.index("--max_steps") + 1] = str(steps)
    return args


def job_record(slurm, job: str) -> str:
    """What a failed job's assertion should show: Slurm's record of the job and the daemons' logs."""
    return slurm.run("scontrol", "show", "job", job, check=False).stdout + "\n" + slurm.logs()


def signal_and_release(slurm, job: str, log_path, steps: int) -> None:
    """Once training runs, SIGUSR1 to the job's steps (what --signal=USR1@N sends before the time limit); when
    the job is requeued, release it at once (Slurm holds a requeued job back for ~2 min)."""
    progress = re.compile(rf"\b(\d+)/{steps} \[")
    deadline = time.monotonic() + 300
    text = ""
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        done = [int(m) for m in progress.findall(text)]
        if done and max(done) >= 5:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"training did not start\n{text[-4000:]}")
    r = slurm.run("scancel", "--signal=USR1", job, check=False)
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        r = slurm.run("scontrol", "show", "job", "-o", job, check=False)
        if "JobState=PENDING" in r.stdout and "Restarts=1" in r.stdout:
            # Pending again only once the node has reported the first run cleaned up (COMPLETING ends then).
            # Then 2 s more: slurmd revoked the old run's credential at the kill, in whole seconds, and refuses
            # a credential created in that same second ("Job N already killed, do not launch batch job",
            # slurm_cred_revoked compares ctime <= revoked) -- the job then ends FAILED. (Waiting for sinfo to
            # say "idle" instead once never ended: it said "mixed" while this job, the only one, was pending)
            time.sleep(2)
            slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
            break
        if "JobState=COMPLETED" in r.stdout or "JobState=FAILED" in r.stdout:
            break
        time.sleep(0.5)


@pytest.mark.slow
def test_preemption_signal_checkpoints_requeues_and_resumes(slurm, launch_demo, runs_dir):
    """SIGUSR1 to the job's steps (what --signal=USR1@120 sends before the time limit, here via
    `scancel --signal=USR1`): torchrun ignores it, the workers checkpoint and stop, finetune.py
    requeues the job, and the requeued run resumes from the checkpoint and finishes."""
    work = runs_dir / "slurm_preempt"
    work.mkdir()
    out, dump = work / "out", work / "ranks"
    steps = 300
    args = tiny_for(steps)
    job = sbatch(slurm, "lora_slurm.sbatch",
                 ["-m", str(launch_demo["model"]), "-d", str(launch_demo["data"]), "-o", str(out), "--", *args,
                  "--per_device_train_batch_size", "1", "--logging_steps", "10"],
                 work, dump, NPROC_PER_NODE=2)
    log_path = work / f"slurm-{job}.out"
    signal_and_release(slurm, job, log_path, steps)
    state = wait_job(slurm, job, timeout=900)
    log = log_path.read_text(errors="replace")
    assert state == "COMPLETED", f"job {job} {state}\n{log[-6000:]}\n{job_record(slurm, job)}"
    assert re.search(STAMP + rf" SLURM job {job}: SIGTERM after \d+ s", log), log[-4000:]
    assert "SIGUSR1 received" in log or "USR1" in log, log[-4000:]
    assert re.search(rf"SLURM job {job} start: .* restart=1", log), log[-4000:]
    assert "--resume_from_checkpoint auto" in log
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert checkpoints, f"no checkpoint in {out}"
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 0 < stopped_at < steps
    assert re.search(r"Resuming from .*checkpoint-\d+", log), log[-4000:]
    run = Run(cmd=["sbatch"], out=out, log=log_path, returncode=0, dump=dump)
    assert run.run_info()["world_size"] == 2
    assert run.adapter()


@pytest.mark.slow
def test_plain_srun_tasks_checkpoint_requeue_and_resume_on_sigusr1(slurm, launch_demo, runs_dir):
    """A site's own batch script with `srun python finetune.py` (one task per GPU, no torchrun): SIGUSR1
    reaches both tasks through srun, they stop at the same step and checkpoint, rank 0 requeues the job,
    and the requeued run (SLURM_RESTART_COUNT=1, no launcher to add the flag) resumes by itself."""
    import shlex
    import sys

    from launchkit import REPO

    work = runs_dir / "srun_tasks_preempt"
    work.mkdir()
    out, dump = work / "out", work / "ranks"
    steps = 300
    args = tiny_for(steps)
    ft = [sys.executable, str(REPO / "finetune.py"), "--config", str(REPO / "recipes" / "lora-default.yaml"),
          "--model_name_or_path", str(launch_demo["model"]), "--data_path", str(launch_demo["data"]),
          "--use_lora", "True", "--q_lora", "False", "--output_dir", str(out), *args,
          "--per_device_train_batch_size", "1", "--logging_steps", "10"]
    script = work / "tasks.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --ntasks=2\n#SBATCH --cpus-per-task=1\n#SBATCH --requeue\n"
                      f"#SBATCH --open-mode=append\nsrun {shlex.join(ft)}\n")
    env = slurm.env(base_env(PYTHONPATH=HOOKS / "dump_weights", QLAUNCH_TEST_DUMP_DIR=dump))
    r = slurm.run("sbatch", "--parsable", f"--chdir={work}", f"--output={work}/slurm-%j.out", str(script), env=env,
                  check=False)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{slurm.logs()}"
    job = r.stdout.strip().split(";")[0]
    log_path = work / f"slurm-{job}.out"
    signal_and_release(slurm, job, log_path, steps)
    state = wait_job(slurm, job, timeout=900)
    log = log_path.read_text(errors="replace")
    assert state == "COMPLETED", f"job {job} {state}\n{log[-6000:]}\n{job_record(slurm, job)}"
    assert "SIGUSR1 received" in log and "Requeued SLURM job" in log, log[-4000:]
    assert "SLURM requeue 1: resuming from the newest checkpoint" in log, log[-4000:]
    assert re.search(r"Resuming from .*checkpoint-\d+", log), log[-4000:]
    run = Run(cmd=["sbatch"], out=out, log=log_path, returncode=0, dump=dump)
    assert run.run_info()["world_size"] == 2 and run.adapter()
    assert_ranks_identical(run, 2)
