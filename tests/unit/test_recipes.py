"""Every shipped recipe parses through the real parser and validates; each names its launch command."""
import glob
import json
import os
import re

import pytest
import yaml

from qlaunch.cli import prepare
from qlaunch.config.arguments import make_parser
from tests.conftest import REPO

RECIPES = sorted(glob.glob(os.path.join(REPO, "recipes", "*.yaml")))


def test_there_are_recipes():
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_parses_and_validates(path, demo, tmp_path):
    with open(path) as f:
        text = f.read()
    keys = set(yaml.safe_load(text))
    known = {a.dest for a in make_parser()._actions}
    assert keys <= known, keys - known
    # nanoGPT-style: the command that runs the recipe is written at its top
    assert "finetune.py --config recipes/" in text or "launch/" in text.split("\n\n")[0]
    values = yaml.safe_load(text)
    model = demo["model"]
    if values.get("lora_target_parameters"):  # an MoE recipe: its expert parameters exist in a tiny MoE of that class
        from tests.moe_models import build_moe

        model = build_moe("mixtral" if "mixtral" in os.path.basename(path) else "qwen3_moe", str(tmp_path / "moe"),
                          demo["model"])
    args = ["--config", path, "--model_name_or_path", model, "--data_path", demo["train"],
            "--output_dir", str(tmp_path / "out")]
    if values.get("lora_target_modules"):
        # the targets are checked against the model's modules before loading: Qwen(1)'s c_attn, w1, ... are not
        # the demo Llama's (the targets are compared with the recipe below only by name: they are exempt)
        args += ["--lora_target_modules", "q_proj", "v_proj"]
    config = prepare(args)
    assert config.lora.use_lora == bool(values.get("use_lora") or values.get("q_lora"))
    machine_dependent = {"fp16", "bf16", "output_dir"}  # precision rules (fp32 on CPU); the test overrides output_dir
    for key, value in values.items():  # every other recipe value reaches the config unchanged
        if key in machine_dependent:
            continue
        part = next(p for p in (config.model, config.data, config.lora, config.training) if hasattr(p, key))
        got = getattr(part, key)
        assert getattr(got, "value", got) == value or key in ("lora_target_modules", "report_to"), key


# ---- every recipe fits the GPU its header names ------------------------------------------------

GENERIC = {"lora-default.yaml", "qlora-default.yaml"}  # the launchers' defaults: no model, no GPU


def header(path):
    with open(path) as f:
        lines = [line for line in f if line.startswith("#")]
    text = "".join(lines)
    gpu = re.search(r"^# GPU: (\S+)(?: x(\d+))?", text, re.M)
    model = re.search(r"--model_name_or_path (\S+)", text)
    deepspeed = re.search(r"--deepspeed (\S+)", text)
    return (gpu.group(1) if gpu else None, int(gpu.group(2) or 1) if gpu else 1,
            model.group(1) if model else None, deepspeed.group(1) if deepspeed else None)


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_fits_the_gpu_its_header_names(path, demo, tmp_path):
    from qlaunch.memory.fit import planned
    from qlaunch.plan import prepare_plan
    from tests.model_dims import DIMS, config_dir

    gpu, count, model, deepspeed = header(path)
    if os.path.basename(path) in GENERIC:
        assert gpu is None
        return
    assert gpu, "a model recipe names the GPU it fits at its top: '# GPU: NAME'"
    model_dir = demo["model"] if model.startswith("runs/demo") else config_dir(model, str(tmp_path))
    assert model.startswith("runs/demo") or model in DIMS
    argv = ["--config", path, "--model_name_or_path", model_dir, "--gpu", gpu, "--num_gpus", str(count)]
    if deepspeed:
        argv += ["--deepspeed", os.path.join(REPO, deepspeed)]
    ns, settings, target, stats, _ = prepare_plan(argv)
    plan = planned(ns, settings, target, stats)
    assert plan["fit"]["fits"], plan["fit"]["text"]
    assert model.startswith("runs/demo") or os.listdir(model_dir) == ["config.json"]  # the plan wrote nothing


# the recipes whose plans do the most work, one of each kind: the largest MoE skeleton (128 experts x 48 layers),
# the other MoE, the largest dense model under a sharding engine, the largest GPTQ base
TIMED = {"qwen3-30b-a3b-moe-qlora.yaml", "mixtral-8x7b-instruct-moe-lora.yaml", "llama3-70b-instruct-nf4-qlora.yaml",
         "qwen-72b-chat-int4-qlora.yaml"}


def test_plan_command_is_fast_and_reads_only_config(tmp_path):
    """`python -m qlaunch.plan` as a user runs it, on the recipes whose plans do the most work (every recipe
    is planned in-process above): its own process (imports included), offline, on a directory holding only
    config.json: nothing written, and at most 5 s above importing the libraries every plan needs, timed in
    the same run (this shared machine's import time alone has ranged from 4 to 10 s between sessions; the
    plan's own work is what qlaunch controls)."""
    import subprocess
    import sys
    import time

    from tests.model_dims import config_dir

    walls = {}
    for path in RECIPES:
        gpu, count, model, deepspeed = header(path)
        if os.path.basename(path) not in TIMED:
            continue
        engine = ["--deepspeed", os.path.join(REPO, deepspeed)] if deepspeed else []
        model_dir = config_dir(model, str(tmp_path / os.path.basename(path)))
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "qlaunch.plan", "--config", path, "--model_name_or_path",
                               model_dir, "--gpu", gpu, "--num_gpus", str(count), *engine, "--json"],
                              capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        walls[os.path.basename(path)] = time.monotonic() - start
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads(proc.stdout)["fit"]["fits"]
        assert os.listdir(model_dir) == ["config.json"]
    floor = min(import_seconds() for _ in range(2))
    print(f"python -m qlaunch.plan wall seconds (importing torch + transformers' TrainingArguments: {floor:.1f}):",
          {k: round(v, 1) for k, v in walls.items()})
    assert len(walls) == len(TIMED)
    assert max(walls.values()) < floor + 5, (floor, walls)


def import_seconds() -> float:
    """Wall seconds of a process that only imports what any plan must: torch and the Trainer's arguments."""
    import subprocess
    import sys
    import time

    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import torch, transformers.training_args"], check=True,
                   capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.monotonic() - start
