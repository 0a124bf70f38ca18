"""The launch scripts' command line: help, errors, quoting, passthrough, env defaults."""
from __future__ import annotations

import shlex
import shutil
import subprocess

import pytest
from launchkit import LAUNCH, REPO, TINY, base_env, free_port, launch

pytestmark = pytest.mark.integration

SCRIPTS = ["qlora_single_gpu.sh", "lora_single_gpu.sh", "qlora_ds.sh", "lora_ds.sh",
           "qlora_slurm.sbatch", "lora_slurm.sbatch"]


def sh(script: str, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                          env=base_env(**env), timeout=60, cwd="/")


def printed_command(stderr: str) -> list[str]:
    """The argv of the `+ cmd` line the scripts print before exec."""
    lines = [line for line in stderr.splitlines() if line.startswith("+ ")]
    assert len(lines) == 1, stderr
    return shlex.split(lines[0][2:])


def test_scripts_are_thin_wrappers_of_the_python_launcher():
    assert not (LAUNCH / "common.sh").exists()
    for script in SCRIPTS:
        text = (LAUNCH / script).read_text()
        assert "-m qlaunch.launch" in text, script
        assert len(text.splitlines()) <= 60, f"{script} should stay thin"
        code = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if script.endswith(".sh"):
            assert len(code) <= 3, f"{script}: {len(code)} lines of code"
        r = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", *(str(LAUNCH / s) for s in SCRIPTS)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_exits_0_with_usage(script, flag):
    r = sh(script, flag)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: ") and "-m, --model" in r.stdout and "--deepspeed" in r.stdout
    assert "NNODES" in r.stdout and "NPROC_PER_NODE" in r.stdout


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("args", [["--bogus"], ["-x"], ["-m", "m", "-d", "d", "stray"], ["-m"], ["-m", "m", "--data"],
                                  ["--model="], ["-d", "data.json"]])
def test_bad_arguments_exit_2_with_usage_on_stderr(script, args):
    r = sh(script, *args)
    assert r.returncode == 2, (args, r.stdout, r.stderr)
    assert "Usage: " in r.stderr and r.stdout == ""


def test_missing_files_are_reported_before_launching(tmp_path):
    r = sh("lora_ds.sh", "-m", "m", "-d", "d", "--deepspeed", str(tmp_path / "nope.json"))
    assert r.returncode == 2 and "file not found" in r.stderr
    r = sh("lora_ds.sh", "-c", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "file not found" in r.stderr


def test_multinode_needs_master_addr_and_a_valid_rank():
    r = sh("qlora_ds.sh", "-m", "m", "-d", "d", NNODES=2, NODE_RANK=0)
    assert r.returncode == 2 and "MASTER_ADDR" in r.stderr
    r = sh("qlora_ds.sh", "-m", "m", "-d", "d", NNODES=2, NODE_RANK=2, MASTER_ADDR="127.0.0.1")
    assert r.returncode == 2 and "NODE_RANK" in r.stderr


def test_printed_command_quotes_spaces_and_passes_everything_after_dashdash(tmp_path):
    model, data, out = "/models/my model", "/data/my data.json", "/out/run 1"
    extra = ["--learning_rate", "1e-4", "--system_message", "You are  a bot; $HOME `x` \"q\"", "--flag=a b"]
    r = sh("qlora_ds.sh", "-m", model, "--data", data, "-o", out, "--", *extra,
           QLAUNCH_PRINT_ONLY=1, NPROC_PER_NODE=2, MASTER_PORT=free_port())
    assert r.returncode == 0, r.stderr
    argv = printed_command(r.stderr)
    assert argv[1:3] == ["-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in argv and "--master_addr=127.0.0.1" in argv
    i = argv.index(str(REPO / "finetune.py"))
    ft = argv[i + 1:]
    assert ft[:2] == ["--config", str(REPO / "recipes" / "qlora-default.yaml")]
    assert ft[ft.index("--model_name_or_path") + 1] == model
    assert ft[ft.index("--data_path") + 1] == data
    assert ft[ft.index("--output_dir") + 1] == out
    assert ft[ft.index("--q_lora") + 1] == "True" and ft[ft.index("--use_lora") + 1] == "True"
    assert ft[ft.index("--deepspeed") + 1] == str(REPO / "ds_configs" / "zero2.json")
    assert ft[-len(extra):] == extra  # verbatim, last (so they win)


def test_user_config_replaces_default_recipe_and_lora_scripts_disable_qlora(tmp_path):
    recipe = tmp_path / "my recipe.yaml"
    recipe.write_text("learning_rate: 1.0e-4\n")
    r = sh("lora_single_gpu.sh", "-c", str(recipe), QLAUNCH_PRINT_ONLY=1)
    assert r.returncode == 0, r.stderr
    argv = printed_command(r.stderr)
    assert argv[1] == str(REPO / "finetune.py")  # single: plain python, no torchrun
    ft = argv[2:]
    assert ft[:2] == ["--config", str(recipe)]
    assert ft[ft.index("--q_lora") + 1] == "False"
    assert "--output_dir" not in ft  # with -c, the recipe (or finetune.py) decides
    assert "--deepspeed" not in ft and "--model_name_or_path" not in ft


@pytest.mark.parametrize("script", ["lora_single_gpu.sh", "qlora_ds.sh"])
def test_world_size_one_runs_plain_python(script):
    """One process in total (no GPU, NPROC_PER_NODE unset): python finetune.py, no torchrun, and no
    rank variables set by the launcher (finetune.py sets them itself when --deepspeed needs them)."""
    r = sh(script, "-m", "m", "-d", "d", QLAUNCH_PRINT_ONLY=1)
    assert r.returncode == 0, r.stderr
    argv = printed_command(r.stderr)
    assert argv[1] == str(REPO / "finetune.py") and "torch.distributed.run" not in argv
    if script == "qlora_ds.sh":
        assert argv[argv.index("--deepspeed") + 1] == str(REPO / "ds_configs" / "zero2.json")


def test_c10d_rendezvous_when_restarts_are_allowed():
    port = free_port()
    r = sh("lora_ds.sh", "-m", "m", "-d", "d", QLAUNCH_PRINT_ONLY=1, NPROC_PER_NODE=2, MAX_RESTARTS=2,
           MASTER_PORT=port)
    assert r.returncode == 0, r.stderr
    argv = printed_command(r.stderr)
    assert "--rdzv_backend=c10d" in argv and f"--rdzv_endpoint=127.0.0.1:{port}" in argv
    assert "--max_restarts=2" in argv and "--local_addr=127.0.0.1" in argv
    assert not any(a.startswith("--master_addr") for a in argv)


def test_gpus_per_node_env_sets_process_count_without_gpus():
    r = sh("qlora_ds.sh", "-m", "m", "-d", "d", QLAUNCH_PRINT_ONLY=1, GPUS_PER_NODE=3, NNODES=2, NODE_RANK=1,
           MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    assert r.returncode == 0, r.stderr
    argv = printed_command(r.stderr)
    assert "--nproc_per_node=3" in argv and "--nnodes=2" in argv and "--node_rank=1" in argv


@pytest.mark.torchrun
def test_spaces_in_paths_and_passthrough_reach_finetune(launch_demo, tmp_path):
    """A real run where model, data and output paths contain spaces, from another cwd."""
    root = tmp_path / "my runs" / "with spaces"
    model = root / "base model"
    data = root / "train data.json"
    root.mkdir(parents=True)
    shutil.copytree(launch_demo["model"], model)
    shutil.copy(launch_demo["data"], data)
    out = root / "out dir"
    run = launch("lora_single_gpu.sh",
                 ["-m", str(model), "-d", str(data), "-o", str(out), "--", *TINY, "--max_steps", "2",
                  "--per_device_train_batch_size", "2"],
                 out, cwd=tmp_path, dump=False).check()
    assert len(run.losses()) == 2  # --max_steps 2 after -- won over TINY's 4 (the last value wins)
    info = run.run_info()
    assert info["world_size"] == 1 and info["use_lora"] is True
    assert run.adapter()


@pytest.mark.torchrun
def test_passthrough_errors_come_from_finetune(launch_demo, tmp_path):
    run = launch("lora_single_gpu.sh",
                 ["-m", str(launch_demo["model"]), "-d", str(launch_demo["data"]), "-o", str(tmp_path / "o"),
                  "--", "--no_such_flag_xyz", "1"], tmp_path / "o", dump=False)
    assert run.returncode == 2, run.tail()
    assert "--no_such_flag_xyz" in run.text and "finetune.py" in run.text


@pytest.mark.parametrize("script", ["qlora_ds.sh", "lora_single_gpu.sh"])
def test_bad_finetune_input_is_refused_once_before_any_process_starts(script, launch_demo, tmp_path):
    """finetune.py's checks run in the launcher first: one report, exit 2, no torchrun, nothing written
    (before, 2 processes each printed the problem and torchrun's failure report followed, exit 1)."""
    out = tmp_path / "out"
    r = sh(script, "-m", str(launch_demo["model"]), "-d", str(tmp_path / "missing.json"), "-o", str(out), "--",
           "--learning_rate", "inf", NPROC_PER_NODE=2)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"{script}: error: 2 problems:" in r.stderr
    assert "--data_path: file not found" in r.stderr and "--learning_rate inf: must be a finite number" in r.stderr
    assert "Nothing was started." in r.stderr and "Traceback" not in r.stderr
    assert "ChildFailedError" not in r.stderr and "finetune.py: error" not in r.stderr  # no worker ever ran
    assert not out.exists()
