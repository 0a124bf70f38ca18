"""FSDP2 on CUDA devices: the same equality as on CPU, and each rank's memory against the plan.

Needs 2 GPUs. A ~300M random Llama (built locally) trains NF4 Q-LoRA under FSDP2 with 2 processes
and with 1, bf16 where the GPU has it; each rank's torch.cuda.max_memory_allocated() is compared with
the plan's per-device numbers for the same flags (±25%, the CUDA context excluded: the allocator does
not count it). The 4-bit base is built in host memory on rank 0 only (quantization state and all moved
to the GPU by fully_shard on rank 0, by the scatter on rank 1): rank 1 never reads the checkpoint. The
offload variant runs the same scatter into host-memory shards (it cannot run on a CPU world)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs 2 CUDA devices")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FSDP2 = os.path.join(REPO, "fsdp_configs", "fsdp2.json")
TRAIN = ["--max_steps", "4", "--model_max_length", "512", "--lora_r", "16", "--lora_dropout", "0",
         "--learning_rate", "1e-4", "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--save_strategy", "no",
         "--logging_steps", "1", "--seed", "42", "--data_seed", "42", "--report_to", "none"]


def gpu_env(**extra):
    from launchkit import base_env

    env = base_env(**extra)
    env.pop("CUDA_VISIBLE_DEVICES", None)  # base_env hides GPUs for the CPU tests
    return env


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    sys.path.insert(0, os.path.join(REPO, "bench"))
    from sharding import build_model

    return build_model(str(tmp_path_factory.mktemp("gpu")))


def test_fsdp2_nf4_on_two_gpus_equals_one_and_memory_follows_the_plan(model, tmp_path):
    from launchkit import launch

    path, data = model
    one = launch("qlora_single_gpu.sh", ["-m", path, "-d", data, "-o", str(tmp_path / "one"), "--", *TRAIN,
                                         "--per_device_train_batch_size", "2"],
                 tmp_path / "one", env=gpu_env()).check()
    two = launch("qlora_ds.sh", ["--fsdp", FSDP2, "-m", path, "-d", data, "-o", str(tmp_path / "two"), "--", *TRAIN,
                                 "--per_device_train_batch_size", "1"],
                 tmp_path / "two", env=gpu_env(NPROC_PER_NODE=2)).check()
    assert two.run_info()["world_size"] == 2 and two.run_info()["engine"] == "FSDP2"
    np.testing.assert_allclose(two.losses(), one.losses(), rtol=1e-2)  # bf16 reduction order
    plan = json.loads(subprocess.run(
        [sys.executable, "-m", "qlaunch.plan", "--config", os.path.join(REPO, "recipes", "qlora-default.yaml"),
         "--model_name_or_path", path, "--q_lora", "--fsdp_config", FSDP2, *TRAIN, "--per_device_train_batch_size",
         "1", "--num_gpus", "2", "--json"], capture_output=True, text=True, check=True, cwd=REPO).stdout)["memory_gb"]
    context = plan["persistent"].get("CUDA context", 0)
    for f in sorted(two.dump.glob("rank*.pt")):
        dump = torch.load(f, weights_only=True)
        measured = dump["max_memory_allocated"] / 1024**3
        planned = max(plan["training_peak"], plan["load_peak"]) - context
        assert 0.75 * planned <= measured <= 1.25 * planned, (dump["rank"], measured, planned)
        assert dump["local_param_bytes"] <= dump["full_param_bytes"] / 2 * 1.1
        assert dump["from_pretrained_calls"] == (1 if dump["rank"] == 0 else 0)


def test_fsdp2_offload_nf4_on_two_gpus_equals_one(model, tmp_path):
    from launchkit import launch

    path, data = model
    args = ["-m", path, "-d", data, "--", *TRAIN]
    one = launch("qlora_single_gpu.sh", ["-o", str(tmp_path / "one"), *args, "--per_device_train_batch_size", "2"],
                 tmp_path / "one", env=gpu_env()).check()
    two = launch("qlora_ds.sh", ["--fsdp", os.path.join(REPO, "fsdp_configs", "fsdp2_offload.json"),
                                 "-o", str(tmp_path / "two"), *args, "--per_device_train_batch_size", "1"],
                 tmp_path / "two", env=gpu_env(NPROC_PER_NODE=2)).check()
    assert "reached their shards on every rank" in two.text
    np.testing.assert_allclose(two.losses(), one.losses(), rtol=1e-2)
