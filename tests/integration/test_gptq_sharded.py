"""GPTQ Int4 Q-LoRA sharded across 2 processes (CPU, gloo): ZeRO-3 and FSDP2 against one process.

The packed GPTQ tensors become frozen float parameters of the same bytes (qlaunch/model/gptq_shard.py),
so the engines shard them. Each 2-process run must form one world of 2, hold about half of the
parameter bytes (packed weights included) on each rank, end with the same adapter on every rank, equal
the 1-process run with the same global batch (dropout 0) — and every quantized layer's kernel must read,
gathered, exactly the bytes it reads in one process, whose qweight / scales / g_idx are the checkpoint's.
Only rank 0 reads the checkpoint; under both engines resuming from a mid-run checkpoint ends
bit-identical.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from launchkit import GLOBAL_BATCH, REPO, TINY, base_env, launch, max_abs_diff
from test_deepspeed import deepspeed_ops  # noqa: F401  (fixture: DeepSpeed's CPU ops, built once)
from test_fsdp import assert_sharded, rank_dumps, relative_adapter_diff
from test_torchrun import assert_ranks_identical

pytest.importorskip("gptqmodel", reason="GPTQ tests need gptqmodel: pip install 'qlaunch[gptq]'")
pytestmark = [pytest.mark.integration, pytest.mark.torchrun, pytest.mark.gptq]

FSDP2 = str(REPO / "fsdp_configs" / "fsdp2.json")
ZERO3 = str(REPO / "ds_configs" / "zero3.json")
RTOL = 1e-4  # losses and adapters (the bound); measured: ~3e-5 for adapters, losses equal
CHECKPOINTED = ["--save_strategy", "steps", "--save_steps", "2"]
PACKED = ("qweight", "qzeros", "scales", "g_idx")


@pytest.fixture(scope="module")
def gptq_demo(launch_demo, tmp_path_factory):
    from qlaunch.model.gptq_pack import make_gptq_checkpoint

    model = make_gptq_checkpoint(str(launch_demo["model"]), str(tmp_path_factory.mktemp("gptq") / "model"))
    return {**launch_demo, "model": model}


def gptq_args(demo, out, batch: int, *extra: str, engine: list[str] = ()) -> list[str]:
    return [*engine, "-m", str(demo["model"]), "-d", str(demo["data"]), "-o", str(out), "--", *TINY,
            "--per_device_train_batch_size", str(batch), *extra]


@pytest.fixture(scope="module")
def gptq_single(gptq_demo, runs_dir):
    out = runs_dir / "gptq_single"
    return launch("qlora_single_gpu.sh", gptq_args(gptq_demo, out, GLOBAL_BATCH), out).check()


@pytest.fixture(scope="module")
def gptq_fsdp(gptq_demo, runs_dir):
    out = runs_dir / "gptq_fsdp2"
    return launch("qlora_ds.sh", gptq_args(gptq_demo, out, GLOBAL_BATCH // 2, *CHECKPOINTED, engine=["--fsdp", FSDP2]),
                  out, env=base_env(NPROC_PER_NODE=2)).check()


@pytest.fixture(scope="module")
def gptq_zero3(gptq_demo, runs_dir, deepspeed_ops):
    out = runs_dir / "gptq_zero3"
    return launch("qlora_ds.sh", gptq_args(gptq_demo, out, GLOBAL_BATCH // 2, *CHECKPOINTED,
                                           engine=["--deepspeed", ZERO3]),
                  out, env=base_env(NPROC_PER_NODE=2)).check()


def checkpoint_sha256(model_dir) -> dict[str, dict[str, str]]:
    """sha256 of qweight / scales / g_idx per layer, read from the checkpoint's safetensors (qzeros are
    converted to gptqmodel's v2 format at load, in one process as in many)."""
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    layers: dict[str, dict[str, str]] = {}
    for name, tensor in tensors.items():
        layer, _, key = name.rpartition(".")
        if key in ("qweight", "scales", "g_idx"):
            layers.setdefault(layer, {})[key] = hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8)
                                                               .numpy().tobytes()).hexdigest()
    return layers


def assert_kernels_read_the_checkpoint_bytes(run, single, model_dir) -> None:
    reference = rank_dumps(single)[0]["packed_sha256"]
    assert len(reference) == 14, sorted(reference)
    on_disk = checkpoint_sha256(model_dir)
    for name, digests in reference.items():  # one process: the kernel reads the checkpoint's bytes
        layer = name.removeprefix("base_model.model.").removesuffix(".base_layer")
        assert {k: digests[k] for k in ("qweight", "scales", "g_idx")} == on_disk[layer], name
    for rank, dump in rank_dumps(run).items():  # sharded, then gathered for the kernel: the same bytes
        assert dump["packed_sha256"] == reference, f"rank {rank}: packed bytes differ from one process"


def assert_equal_to_one_process(run, single) -> None:
    np.testing.assert_allclose(run.losses(), single.losses(), rtol=RTOL)
    diff = relative_adapter_diff(run, single)
    print(f"relative adapter diff vs 1 process: {diff:.3g}")
    assert diff <= RTOL


def test_gptq_fsdp2_two_processes_shard_the_packed_weights_and_equal_one(gptq_fsdp, gptq_single, gptq_demo):
    info = gptq_fsdp.run_info()
    assert info["world_size"] == 2 and info["engine"] == "FSDP2" and info["quant_method"] == "gptq", info
    assert "FSDP2 with GPTQ: packed weights become frozen torch.float32 parameters" in gptq_fsdp.text
    assert_ranks_identical(gptq_fsdp, 2)
    assert_sharded(gptq_fsdp, 2)  # the packed weights are parameters now: they count and they shard
    # rank 0 alone read the checkpoint (accelerate broadcasts its tensors after fully_shard)
    assert [d["from_pretrained_calls"] for _, d in sorted(rank_dumps(gptq_fsdp).items())] == [1, 0]
    assert_kernels_read_the_checkpoint_bytes(gptq_fsdp, gptq_single, gptq_demo["model"])
    assert_equal_to_one_process(gptq_fsdp, gptq_single)


def test_an_adapter_trained_sharded_merges_into_the_dequantized_gptq_weights(gptq_fsdp, tmp_path):
    from test_workflow import merge_report, python_m

    python_m("qlaunch.merge", "--adapter", gptq_fsdp.out, "--out", tmp_path / "merged")  # exit 0: the proof held
    report = merge_report(tmp_path / "merged")
    assert report["within_tolerance"], report


def test_gptq_zero3_two_processes_shard_the_packed_weights_and_equal_one(gptq_zero3, gptq_single, gptq_demo):
    info = gptq_zero3.run_info()
    assert info["world_size"] == 2 and info["engine"] == "ZeRO-3" and info["quant_method"] == "gptq", info
    assert "ZeRO-3 with GPTQ: packed weights become frozen torch.float32 parameters" in gptq_zero3.text
    assert_ranks_identical(gptq_zero3, 2)
    assert_sharded(gptq_zero3, 2)
    # rank 0 alone read the checkpoint; zero.Init partitioned it before the engine could place it whole
    assert [d["from_pretrained_calls"] for _, d in sorted(rank_dumps(gptq_zero3).items())] == [1, 0]
    assert "ZeRO-3: " in gptq_zero3.text and "parameters partitioned across 2 ranks" in gptq_zero3.text
    assert_kernels_read_the_checkpoint_bytes(gptq_zero3, gptq_single, gptq_demo["model"])
    assert_equal_to_one_process(gptq_zero3, gptq_single)


def assert_resume_equals_uninterrupted(uninterrupted, demo, out, engine: list[str]) -> None:
    """Resuming from the run's mid-run checkpoint-2, with the same flags, ends bit-identical to it."""
    out.mkdir()
    shutil.copytree(uninterrupted.out / "checkpoint-2", out / "checkpoint-2")
    run = launch("qlora_ds.sh", gptq_args(demo, out, GLOBAL_BATCH // 2, *CHECKPOINTED, "--resume_from_checkpoint",
                                          "auto", engine=engine),
                 out, env=base_env(NPROC_PER_NODE=2)).check()
    assert "Resuming from" in run.text and "checkpoint-2" in run.text
    assert max_abs_diff(run.adapter(), uninterrupted.adapter()) == 0.0
    assert run.losses()[-2:] == uninterrupted.losses()[-2:]


def test_gptq_fsdp2_resume_from_a_mid_run_checkpoint_equals_the_uninterrupted_run(gptq_demo, runs_dir, gptq_fsdp):
    # the checkpoint holds the adapter, not the packed base under peft's second name for the layer
    saved = torch.load(gptq_fsdp.out / "checkpoint-2" / "pytorch_model_fsdp.bin", weights_only=True)
    assert saved and all("lora_" in key for key in saved), sorted(saved)[:4]
    assert_resume_equals_uninterrupted(gptq_fsdp, gptq_demo, runs_dir / "gptq_fsdp2_resumed", ["--fsdp", FSDP2])


def test_gptq_zero3_resume_from_a_mid_run_checkpoint_equals_the_uninterrupted_run(gptq_demo, runs_dir, gptq_zero3):
    assert_resume_equals_uninterrupted(gptq_zero3, gptq_demo, runs_dir / "gptq_zero3_resumed", ["--deepspeed", ZERO3])
