"""ZeRO-3 with a 4-bit base on CUDA devices: loaded as shards, equal to one GPU, memory against the plan.

Needs 2 GPUs. The ~300M random Llama of bench/sharding.py trains NF4 Q-LoRA under ZeRO-3 with 2 processes
and with 1. The base is built in rank 0's host memory and deepspeed.zero.Init moves one parameter at a time
to the GPUs (qlaunch/model/zero3_init.py), so the load is never whole on a GPU: each rank's
torch.cuda.max_memory_allocated() stays within ±25% of the plan's per-device peak (which on the GPU is the
training phase, not a whole-model load), rank 1 never reads the checkpoint, and the 4-bit layers' quantization
states reach the GPU (the forward would fail otherwise)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_fsdp2_gpu import REPO, TRAIN, gpu_env, model  # noqa: F401  (the model fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs 2 CUDA devices")

ZERO3 = os.path.join(REPO, "ds_configs", "zero3.json")


def test_zero3_nf4_on_two_gpus_loads_sharded_equals_one_and_follows_the_plan(model, tmp_path):  # noqa: F811
    from launchkit import launch

    path, data = model
    one = launch("qlora_single_gpu.sh", ["-m", path, "-d", data, "-o", str(tmp_path / "one"), "--", *TRAIN,
                                         "--per_device_train_batch_size", "2"],
                 tmp_path / "one", env=gpu_env()).check()
    two = launch("qlora_ds.sh", ["--deepspeed", ZERO3, "-m", path, "-d", data, "-o", str(tmp_path / "two"), "--",
                                 *TRAIN, "--per_device_train_batch_size", "1"],
                 tmp_path / "two", env=gpu_env(NPROC_PER_NODE=2)).check()
    assert two.run_info()["world_size"] == 2 and "parameters partitioned across 2 ranks" in two.text
    np.testing.assert_allclose(two.losses(), one.losses(), rtol=1e-2)  # bf16 reduction order
    plan = json.loads(subprocess.run(
        [sys.executable, "-m", "qlaunch.plan", "--config", os.path.join(REPO, "recipes", "qlora-default.yaml"),
         "--model_name_or_path", path, "--q_lora", "--deepspeed", ZERO3, *TRAIN, "--per_device_train_batch_size",
         "1", "--num_gpus", "2", "--json"], capture_output=True, text=True, check=True, cwd=REPO).stdout)["memory_gb"]
    assert plan["load_peak"] < plan["training_peak"]  # loaded as shards: loading is not the limit
    context = plan["persistent"].get("CUDA context", 0)
    for f in sorted(two.dump.glob("rank*.pt")):
        dump = torch.load(f, weights_only=True)
        measured = dump["max_memory_allocated"] / 1024**3
        planned = plan["per_device_peak"] - context
        assert 0.75 * planned <= measured <= 1.25 * planned, (dump["rank"], measured, planned)
        assert dump["from_pretrained_calls"] == (1 if dump["rank"] == 0 else 0)
