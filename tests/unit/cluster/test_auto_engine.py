"""--engine auto: the launcher plans the job for the world size it starts and picks the cheapest engine that
fits the GPU (qlaunch.memory.fit.AUTO_ENGINES order). GPU facts are passed in: this machine has none."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qlaunch.cluster.facts import Facts, LaunchError
from qlaunch.cluster.plan import ROOT
from qlaunch.config.machine import Machine
from qlaunch.launch import launch_plan_for, parse
from qlaunch.memory.gpus import find_gpu, machine_for
from qlaunch.memory.planner import Target
from tests.model_dims import config_dir

PY = "/venv/bin/python"
RECIPE_70B = str(ROOT / "recipes" / "llama3-70b-instruct-nf4-qlora.yaml")


def gpu_target(name: str, n: int) -> Target:
    device = find_gpu(name)
    return Target(machine_for(device, n), device.memory_bytes, device.name)


def launched(argv: list[str], facts: Facts, target: Target | None, env=None):
    return launch_plan_for(parse(argv, "qlora", "dist"), env or {}, facts, PY, target=target)


def engine_flags(argv: list[str]) -> dict:
    return {flag: argv[argv.index(flag) + 1] for flag in ("--deepspeed", "--fsdp_config") if flag in argv}


@pytest.fixture(scope="module")
def llama70b(tmp_path_factory):
    return config_dir("meta-llama/Meta-Llama-3-70B-Instruct", str(tmp_path_factory.mktemp("cfg")))


def test_70b_nf4_on_eight_4090s_gets_zero3_because_ddp_and_zero2_do_not_fit(llama70b):
    p = launched(["--engine", "auto", "-c", RECIPE_70B, "-m", llama70b, "-d", "unused.json"], Facts(gpus=8, cpus=64),
                 gpu_target("RTX-4090", 8))
    assert engine_flags(p.argv) == {"--deepspeed": str(ROOT / "ds_configs" / "zero3.json")}
    assert "--nproc_per_node=8" in p.argv
    note = p.notes[0]
    assert note.startswith("--engine auto: ZeRO-3 --deepspeed ds_configs/zero3.json") and "8x RTX-4090" in note
    assert "DDP needs 55.1" in note and "ZeRO-2 needs 44.8" in note


def test_the_same_job_on_eight_80gb_gpus_stays_on_ddp(llama70b):
    p = launched(["--engine", "auto", "-c", RECIPE_70B, "-m", llama70b, "-d", "unused.json"], Facts(gpus=8, cpus=64),
                 gpu_target("A100-80GB", 8))
    assert engine_flags(p.argv) == {}  # plain DDP: the cheapest, and it fits
    assert p.notes[0].startswith("--engine auto: DDP, ") and "the cheapest that fits" in p.notes[0]


def test_one_24gb_gpu_has_nothing_that_fits_and_says_so(llama70b):
    with pytest.raises(LaunchError) as e:
        launched(["--engine", "auto", "-c", RECIPE_70B, "-m", llama70b, "-d", "unused.json"], Facts(gpus=1, cpus=8),
                 gpu_target("RTX-4090", 1))
    text = str(e.value)
    assert "no engine fits 1x RTX-4090" in text and "one process" in text and "ZeRO-3 + offload" in text


def test_without_a_gpu_the_cheapest_engine_is_used(llama70b):
    p = launched(["--engine", "auto", "-c", RECIPE_70B, "-m", llama70b, "-d", "unused.json"], Facts(gpus=0, cpus=2),
                 Target(Machine(cuda=False), None, "CPU"), env={"NPROC_PER_NODE": "2"})
    assert engine_flags(p.argv) == {} and "no device memory limit known here" in p.notes[0]


@pytest.mark.parametrize("extra", [["--deepspeed", "ds_configs/zero3.json"], ["--fsdp", "fsdp_configs/fsdp2.json"],
                                   ["--", "--deepspeed", "ds_configs/zero3.json"]])
def test_auto_and_an_explicit_engine_are_refused_together(llama70b, extra):
    with pytest.raises(LaunchError, match="--engine auto chooses the engine"):
        launched(["--engine", "auto", "-m", llama70b, "-d", "unused.json", *extra], Facts(gpus=8, cpus=64),
                 gpu_target("RTX-4090", 8))


def test_a_model_that_cannot_be_planned_is_one_line_before_anything_starts(tmp_path):
    with pytest.raises(LaunchError, match="--engine auto: "):
        launched(["--engine", "auto", "-m", str(tmp_path / "missing"), "-d", "unused.json"], Facts(gpus=8, cpus=64),
                 gpu_target("RTX-4090", 8))


def test_the_plan_command_prints_the_choice_and_plans_it(llama70b):
    argv = [sys.executable, "-m", "qlaunch.plan", "--config", RECIPE_70B, "--model_name_or_path", llama70b,
            "--gpu", "RTX-4090", "--num_gpus", "8", "--engine", "auto", "--json"]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["engine_choice"]["chosen"]["engine"] == "ZeRO-3" and plan["job"]["zero_stage"] == 3
    assert [c["engine"] for c in plan["engine_choice"]["tried"]] == [
        "DDP", "ZeRO-2", "ZeRO-3", "FSDP2", "ZeRO-3 + offload", "FSDP2 + CPU offload"]
    assert plan["fit"]["fits"] is True
    r = subprocess.run(argv[:-1] + ["--deepspeed", "ds_configs/zero2.json"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "--engine auto chooses the engine" in r.stderr and "Traceback" not in r.stderr
