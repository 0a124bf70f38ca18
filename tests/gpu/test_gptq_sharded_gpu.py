"""GPTQ Int4 Q-LoRA sharded on CUDA devices: the CPU equality of tests/integration/test_gptq_sharded.py.

Needs 2 GPUs. Our own GPTQ checkpoint of the ~300M random Llama (`qlaunch.quantize`, as bench/sharding.py
--quant gptq makes it) trains under ZeRO-3 and FSDP2 with 2 processes and with 1 (fp16, the GPTQ compute
dtype): per-step losses within 1e-3 relative (fp16 reduction order), every rank holds about half of the
parameter bytes (the packed weights are parameters: qlaunch/model/gptq_shard.py), the kernels read the
same packed bytes as the 1-process run, and under FSDP2 rank 1 never reads the checkpoint. On GPUs the
base is built in host memory with gptqmodel's Torch kernel (qlaunch.model.gptq.trainable_backend): the
run log names it."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs 2 CUDA devices")
pytest.importorskip("gptqmodel")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENGINES = {"FSDP2": ["--fsdp", os.path.join(REPO, "fsdp_configs", "fsdp2.json")],
           "ZeRO-3": ["--deepspeed", os.path.join(REPO, "ds_configs", "zero3.json")]}
TRAIN = ["--max_steps", "4", "--model_max_length", "512", "--lora_r", "16", "--lora_dropout", "0",
         "--learning_rate", "1e-4", "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--save_strategy", "no",
         "--logging_steps", "1", "--seed", "42", "--data_seed", "42", "--report_to", "none", "--fp16", "True"]


@pytest.fixture(scope="module")
def gptq_model(tmp_path_factory):
    sys.path.insert(0, os.path.join(REPO, "bench"))
    from sharding import build_model

    return build_model(str(tmp_path_factory.mktemp("gpu_gptq")), "gptq")


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_gptq_on_two_gpus_shards_and_equals_one(gptq_model, tmp_path, engine):
    from test_fsdp2_gpu import gpu_env
    from launchkit import launch

    path, data = gptq_model
    one = launch("qlora_single_gpu.sh", ["-m", path, "-d", data, "-o", str(tmp_path / "one"), "--", *TRAIN,
                                         "--per_device_train_batch_size", "2"], tmp_path / "one", env=gpu_env()).check()
    two = launch("qlora_ds.sh", [*ENGINES[engine], "-m", path, "-d", data, "-o", str(tmp_path / "two"), "--", *TRAIN,
                                 "--per_device_train_batch_size", "1"],
                 tmp_path / "two", env=gpu_env(NPROC_PER_NODE=2)).check()
    assert two.run_info()["world_size"] == 2 and two.run_info()["engine"] == engine
    np.testing.assert_allclose(two.losses(), one.losses(), rtol=1e-3)
    reference = torch.load(sorted(one.dump.glob("rank*.pt"))[0], weights_only=True)["packed_sha256"]
    for f in sorted(two.dump.glob("rank*.pt")):
        dump = torch.load(f, weights_only=True)
        assert dump["packed_sha256"] == reference, dump["rank"]
        assert dump["local_param_bytes"] <= dump["full_param_bytes"] / 2 * 1.1
        if engine == "FSDP2":
            assert dump["from_pretrained_calls"] == (1 if dump["rank"] == 0 else 0)
            assert "TorchLinear" in two.text  # the Torch kernel, not the CPU-only one gptqmodel picks on the host
