"""qlaunch.launch.plan: the command for each environment, checked with torchrun's own parser."""
import argparse

import pytest
from torch.distributed.run import get_args_parser

from qlaunch.cluster.facts import Facts, LaunchError, gpu_count
from qlaunch.cluster.plan import ROOT, plan
from qlaunch.cluster.rendezvous import single_process_env
from qlaunch.launch import parse

PY = "/venv/bin/python"
FT = str(ROOT / "finetune.py")
ZERO2 = str(ROOT / "ds_configs" / "zero2.json")
CPU_BOX = Facts(gpus=0, cpus=2, free_port=40001)
GPU_BOX = Facts(gpus=8, cpus=96, free_port=40001)


def make(argv, env, facts, method="qlora", mode="dist"):
    return plan(parse(argv, method, mode), env, facts, PY)


def torchrun_args(argv: list[str]) -> argparse.Namespace:
    """Parse the planned torchrun command with torchrun's own parser (the flags must be valid)."""
    assert argv[:3] == [PY, "-m", "torch.distributed.run"], argv
    return get_args_parser().parse_args(argv[3:])


def finetune_part(argv: list[str]) -> list[str]:
    return argv[argv.index(FT) + 1:]


def test_one_node_cpu_one_process_is_plain_python():
    p = make(["-m", "M", "-d", "D"], {}, CPU_BOX)
    assert p.argv[:2] == [PY, FT]
    ft = finetune_part(p.argv)
    assert ft[:2] == ["--config", str(ROOT / "recipes" / "qlora-default.yaml")]
    assert ft[ft.index("--deepspeed") + 1] == ZERO2 and ft[ft.index("--q_lora") + 1] == "True"
    assert p.env == {"OMP_NUM_THREADS": "2"}  # CPUs / processes
    assert "RANK" not in p.env and any("world size 1" in n for n in p.notes)


def test_one_node_cpu_two_processes_standalone():
    p = make(["-m", "M", "-d", "D", "--deepspeed", "none"], {"NPROC_PER_NODE": "2"}, CPU_BOX, method="lora")
    args = torchrun_args(p.argv)
    assert args.standalone and args.nproc_per_node == "2" and args.nnodes == "1" and args.max_restarts == 0
    assert "--deepspeed" not in finetune_part(p.argv)
    assert finetune_part(p.argv)[finetune_part(p.argv).index("--q_lora") + 1] == "False"
    assert p.env["OMP_NUM_THREADS"] == "1"


def test_eight_gpus_one_node():
    p = make(["-m", "M", "-d", "D"], {}, GPU_BOX)
    args = torchrun_args(p.argv)
    assert args.nproc_per_node == "8" and args.standalone
    assert "OMP_NUM_THREADS" not in p.env and not any("no GPU" in n for n in p.notes)


def test_cuda_visible_devices_caps_the_gpu_count():
    lines = [f"GPU {i}: NVIDIA A100 (UUID: x)" for i in range(8)]
    assert gpu_count({}, lines) == 8
    assert gpu_count({"CUDA_VISIBLE_DEVICES": "0,3"}, lines) == 2
    assert gpu_count({"CUDA_VISIBLE_DEVICES": ""}, lines) == 0
    assert gpu_count({"CUDA_VISIBLE_DEVICES": "-1"}, lines) == 0
    assert gpu_count({}, []) == 0


def test_single_gpu_script_pins_gpu_0_of_several():
    p = make(["-m", "M", "-d", "D"], {}, GPU_BOX, mode="single")
    assert p.argv[:2] == [PY, FT] and p.env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert "--deepspeed" not in p.argv
    assert make(["-m", "M", "-d", "D"], {"CUDA_VISIBLE_DEVICES": "5"}, GPU_BOX, mode="single").env == {}


def test_two_nodes_static_rendezvous():
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "GPUS_PER_NODE": "8"}
    args = torchrun_args(make(["-m", "M", "-d", "D"], env, GPU_BOX).argv)
    assert (args.nnodes, args.node_rank, args.master_addr, args.master_port) == ("2", 1, "10.0.0.1", 29500)
    assert args.rdzv_backend == "static" and not args.standalone and args.local_addr is None
    with pytest.raises(LaunchError, match="set MASTER_ADDR"):
        make(["-m", "M", "-d", "D"], {"NNODES": "2"}, GPU_BOX)
    with pytest.raises(LaunchError, match="NODE_RANK=2 must be < NNODES=2"):
        make(["-m", "M", "-d", "D"], {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "a"}, GPU_BOX)


def test_restarts_switch_to_c10d_with_own_worker_store():
    p = make(["-m", "M", "-d", "D"], {"MAX_RESTARTS": "2", "NPROC_PER_NODE": "2"}, CPU_BOX)
    args = torchrun_args(p.argv)
    assert args.rdzv_backend == "c10d" and args.rdzv_endpoint == "127.0.0.1:40001" and args.max_restarts == 2
    assert args.local_addr == "127.0.0.1" and args.rdzv_id == "qlaunch"
    assert p.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # pytorch#135712
    two_nodes = {"MAX_RESTARTS": "1", "NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "node0",
                 "MASTER_PORT": "29400", "RDZV_ID": "job7"}
    args = torchrun_args(make(["-m", "M", "-d", "D"], two_nodes, GPU_BOX).argv)
    assert (args.rdzv_endpoint, args.rdzv_id, args.nnodes) == ("node0:29400", "job7", "2")
    with pytest.raises(LaunchError, match="MAX_RESTARTS='x': must be a whole number >= 0"):
        make(["-m", "M", "-d", "D"], {"MAX_RESTARTS": "x"}, GPU_BOX)


def slurm_env(node_id: int, **extra) -> dict:
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "4", "SLURM_NODEID": str(node_id),
           "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_GPUS_ON_NODE": "8",
           # stale values from the submitting shell: never used inside the allocation
           "MASTER_ADDR": "stale.invalid", "MASTER_PORT": "1", "NNODES": "7"}
    return {**env, **extra}


SLURM_FACTS = Facts(gpus=0, cpus=64, free_port=1, slurm_first_host="gpu01", slurm_first_addr="10.1.0.1")


def test_slurm_four_nodes_rendezvous_on_first_node_and_is_host_from_node_id():
    plans = [make(["-m", "M", "-d", "D"], slurm_env(i), SLURM_FACTS, mode="slurm") for i in range(4)]
    parsed = [torchrun_args(p.argv) for p in plans]
    endpoints = {a.rdzv_endpoint for a in parsed}
    assert endpoints == {f"10.1.0.1:{20000 + 4242 % 10000}"}  # the same on every node, without talking
    assert all(a.rdzv_backend == "c10d" and a.rdzv_id == "4242" and a.nnodes == "4" for a in parsed)
    assert all(a.nproc_per_node == "8" for a in parsed)  # from the allocation (SLURM_GPUS_ON_NODE)
    assert [a.rdzv_conf for a in parsed] == ["is_host=1", "is_host=0", "is_host=0", "is_host=0"]
    assert any("SLURM job 4242 start: nodes=4" in n for n in plans[0].notes)
    assert not any("start:" in n for n in plans[1].notes)  # one start line per job
    assert "--resume_from_checkpoint" not in plans[0].argv


def test_slurm_requeued_run_resumes_and_overrides_apply():
    p = make(["-m", "M", "-d", "D"], slurm_env(0, SLURM_RESTART_COUNT="1", RDZV_HOST="ib0.gpu01", RDZV_PORT="31000"),
             SLURM_FACTS, mode="slurm")
    ft = finetune_part(p.argv)
    assert ft[ft.index("--resume_from_checkpoint") + 1] == "auto"
    assert torchrun_args(p.argv).rdzv_endpoint == "ib0.gpu01:31000"


def test_slurm_cpu_nodes_split_the_node_cpus():
    env = slurm_env(0, NPROC_PER_NODE="2", SLURM_CPUS_ON_NODE="16")
    del env["SLURM_GPUS_ON_NODE"]
    p = make(["-m", "M", "-d", "D"], env, SLURM_FACTS, mode="slurm")
    assert torchrun_args(p.argv).nproc_per_node == "2" and p.env["OMP_NUM_THREADS"] == "8"


def test_slurm_outside_a_job_is_refused():
    with pytest.raises(LaunchError, match="not inside a SLURM job"):
        make(["-m", "M", "-d", "D"], {}, SLURM_FACTS, mode="slurm")


@pytest.mark.parametrize("argv,message", [
    (["--bogus"], "unrecognized arguments"),
    (["-m", "m", "-d", "d", "stray"], "unexpected argument: stray"),
    (["-m"], "expected one argument"),
    (["--model="], "needs a non-empty value"),
    (["-d", "d"], "-m/--model is required"),
    (["-m", "m"], "-d/--data is required"),
    (["-c", "/nope.yaml"], "--config: file not found"),
    (["-m", "m", "-d", "d", "--deepspeed", "/nope.json"], "--deepspeed: file not found"),
])
def test_bad_flags_are_launch_errors(argv, message):
    with pytest.raises(LaunchError, match=message):
        make(argv, {}, CPU_BOX)


def test_everything_after_dashdash_is_verbatim_and_last():
    extra = ["--learning_rate", "1e-4", "--", "--x=a b"]
    p = make(["-m", "M", "-d", "D", "-o", "out dir", "--", *extra], {}, CPU_BOX)
    ft = finetune_part(p.argv)
    assert ft[-len(extra):] == extra and ft[ft.index("--output_dir") + 1] == "out dir"


def test_single_process_deepspeed_env_only_without_a_launcher():
    env = single_process_env({}, 41234)
    assert env == {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "41234"}
    assert single_process_env({"MASTER_PORT": "29999"}, 1)["MASTER_PORT"] == "29999"
    assert single_process_env({"RANK": "3", "WORLD_SIZE": "8"}, 1) == {}  # torchrun / deepspeed set these


def test_finetune_sets_the_single_process_deepspeed_env_itself(demo, tmp_path):
    """`python finetune.py --deepspeed …` without any launcher gets loopback rank variables."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    r = subprocess.run([sys.executable, FT, "--model_name_or_path", demo["model"], "--data_path", demo["train"],
                        "--use_lora", "--deepspeed", ZERO2, "--output_dir", str(tmp_path / "o"), "--dry_run", "True"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "single process with DeepSpeed: RANK=0 LOCAL_RANK=0 WORLD_SIZE=1" in r.stderr
    assert "MASTER_ADDR=127.0.0.1" in r.stderr


def test_fsdp_config_replaces_deepspeed_on_eight_gpus_and_slurm():
    fsdp = str(ROOT / "fsdp_configs" / "fsdp2.json")
    p = make(["-m", "M", "-d", "D", "--fsdp", fsdp], {}, GPU_BOX)
    args = torchrun_args(p.argv)
    assert args.nproc_per_node == "8"
    ft = finetune_part(p.argv)
    assert ft[ft.index("--fsdp_config") + 1] == fsdp and "--deepspeed" not in ft
    assert any(f"fsdp={fsdp}" in n for n in p.notes)
    slurm = make(["-m", "M", "-d", "D", "--fsdp", fsdp],
                 {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1"}, GPU_BOX, mode="slurm")
    ft = finetune_part(slurm.argv)
    assert ft[ft.index("--fsdp_config") + 1] == fsdp and "--deepspeed" not in ft
    with pytest.raises(LaunchError, match="one engine"):
        make(["-m", "M", "-d", "D", "--fsdp", fsdp, "--deepspeed", ZERO2], {}, GPU_BOX)
    assert "--fsdp_config" in finetune_part(make(["-m", "M", "-d", "D", "--fsdp", fsdp, "--deepspeed", "none"],
                                                 {}, GPU_BOX).argv)
    with pytest.raises(LaunchError, match="--fsdp_config: file not found"):
        make(["-m", "M", "-d", "D", "--fsdp", "nope.json"], {}, GPU_BOX)


def test_slurm_workers_are_reached_at_the_node_s_own_address_not_its_hostname():
    """torch publishes rank 0's socket.getfqdn() as the workers' MASTER_ADDR unless torchrun gets
    --local_addr: each node passes its NodeAddr (LOCAL_ADDR overrides); issue 22."""
    facts = Facts(gpus=0, cpus=64, free_port=1, slurm_first_host="gpu01", slurm_first_addr="10.1.0.1",
                  slurm_node_addr="10.1.0.3")
    p = make(["-m", "M", "-d", "D"], slurm_env(2), facts, mode="slurm")
    assert torchrun_args(p.argv).local_addr == "10.1.0.3"
    p = make(["-m", "M", "-d", "D"], slurm_env(2, LOCAL_ADDR="ib0.gpu03"), facts, mode="slurm")
    assert torchrun_args(p.argv).local_addr == "ib0.gpu03"
    p = make(["-m", "M", "-d", "D"], slurm_env(2), SLURM_FACTS, mode="slurm")  # unknown: torch's own default
    assert torchrun_args(p.argv).local_addr is None


def test_slurm_one_cpu_per_task_is_warned_about():
    one = make(["-m", "M", "-d", "D"], slurm_env(0), SLURM_FACTS, mode="slurm")
    assert any("SLURM gives each task 1 CPU unless asked" in n and "--cpus-per-task" in n for n in one.notes)
    many = make(["-m", "M", "-d", "D"], slurm_env(0, SLURM_CPUS_PER_TASK="32"), SLURM_FACTS, mode="slurm")
    assert not any("1 CPU" in n for n in many.notes)
    other_node = make(["-m", "M", "-d", "D"], slurm_env(1), SLURM_FACTS, mode="slurm")
    assert not any("1 CPU" in n for n in other_node.notes)  # said once per job


def test_plain_srun_tasks_get_the_rank_variables_torchrun_would_set():
    """srun --ntasks-per-node=G python finetune.py: no torchrun in between (issue 22)."""
    from qlaunch.cluster.rendezvous import srun_task_env

    step = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_NUM_NODES": "2",
            "SLURM_STEP_NODELIST": "gpu[01-02]"}
    envs = [srun_task_env({**step, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r % 8)}, "10.1.0.1")
            for r in range(16)]
    assert [e["RANK"] for e in envs] == [str(r) for r in range(16)]
    assert {e["WORLD_SIZE"] for e in envs} == {"16"} and {e["LOCAL_WORLD_SIZE"] for e in envs} == {"8"}
    assert [e["LOCAL_RANK"] for e in envs[6:10]] == ["6", "7", "0", "1"]
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == {("10.1.0.1", str(30000 + (4242 * 7) % 10000))}
    assert srun_task_env({**step, "SLURM_PROCID": "0", "RANK": "3"}, "x") == {}  # torchrun set them already
    assert srun_task_env({**step, "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}, "x") == {}  # one task
    # the batch script's own shell under sbatch --ntasks=2: not a task of a step
    assert srun_task_env({"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "x") == {}
