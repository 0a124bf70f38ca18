"""FSDP2 through the launch scripts on CPU (2 processes, gloo, 127.0.0.1): LoRA and NF4 Q-LoRA.

Each 2-process run must form one world of size 2, shard the model (each rank holds about half the
parameter bytes), end with the same weights on every rank, and equal the 1-process run with the same
global batch (dropout 0). The NF4 base is read by rank 0 only (the other rank gets a skeleton and
its shards: qlaunch/model/rank0_load.py). The NF4 run checkpoints mid-run; resuming from that checkpoint must end
bit-identical to the uninterrupted run, and the LoRA run's adapter must load with plain peft.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from launchkit import GLOBAL_BATCH, REPO, TINY, base_env, launch, max_abs_diff
from test_torchrun import assert_ranks_identical

pytestmark = [pytest.mark.integration, pytest.mark.torchrun]

FSDP2 = str(REPO / "fsdp_configs" / "fsdp2.json")
LORA_RTOL = 1e-5  # adapters, relative to the largest weight
NF4_LOSS_RTOL = 1e-3  # bitsandbytes' CPU path computes in bf16
CHECKPOINTED = ["--save_strategy", "steps", "--save_steps", "2"]


def fsdp_args(demo, out, batch: int, *extra: str, fsdp: bool = True) -> list[str]:
    return [*(["--fsdp", FSDP2] if fsdp else []), "-m", str(demo["model"]), "-d", str(demo["data"]),
            "-o", str(out), "--", *TINY, "--per_device_train_batch_size", str(batch), *extra]


def relative_adapter_diff(run, ref) -> float:
    a, b = run.adapter(), ref.adapter()
    return max_abs_diff(a, b) / max(float(t.abs().max()) for t in b.values())


def rank_dumps(run) -> dict:
    return {int(f.stem[4:]): torch.load(f, weights_only=True) for f in sorted(run.dump.glob("rank*.pt"))}


def assert_sharded(run, world_size: int) -> None:
    """Every rank holds about 1/N of the parameter bytes (at most 1/N plus its largest tensor)."""
    dumps = rank_dumps(run)
    assert sorted(dumps) == list(range(world_size))
    for rank, dump in dumps.items():
        local, full = dump["local_param_bytes"], dump["full_param_bytes"]
        print(f"rank {rank}: {local} of {full} parameter bytes ({local / full:.3f})")
        assert full / world_size * 0.9 <= local <= full / world_size * 1.1, (rank, local, full)


@pytest.fixture(scope="module")
def nf4_single(launch_demo, runs_dir):
    out = runs_dir / "fsdp_ref_nf4"
    return launch("qlora_single_gpu.sh", fsdp_args(launch_demo, out, GLOBAL_BATCH, fsdp=False), out).check()


@pytest.fixture(scope="module")
def nf4_fsdp(launch_demo, runs_dir):
    out = runs_dir / "fsdp2_nf4"
    return launch("qlora_ds.sh", fsdp_args(launch_demo, out, GLOBAL_BATCH // 2, *CHECKPOINTED), out,
                  env=base_env(NPROC_PER_NODE=2)).check()


def test_fsdp2_lora_two_processes_equal_one_and_load_with_plain_peft(launch_demo, runs_dir, single_run):
    out = runs_dir / "fsdp2_lora"
    run = launch("lora_ds.sh", fsdp_args(launch_demo, out, GLOBAL_BATCH // 2), out,
                 env=base_env(NPROC_PER_NODE=2)).check()
    info = run.run_info()
    assert info["world_size"] == 2 and info["engine"] == "FSDP2" and info["deepspeed"] is False, info
    assert "--fsdp_config" in run.text and "--deepspeed" not in run.text.split("torch.distributed.run")[1]
    assert_ranks_identical(run, 2)
    assert_sharded(run, 2)
    # a full-precision base is not loaded on rank 0 only: every rank reads it (accelerate shards it)
    assert [d["from_pretrained_calls"] for _, d in sorted(rank_dumps(run).items())] == [1, 1]
    np.testing.assert_allclose(run.losses(), single_run.losses(), rtol=1e-5)
    diff = relative_adapter_diff(run, single_run)
    print(f"FSDP2 LoRA vs 1 process: relative adapter diff {diff:.3g}")
    assert diff <= LORA_RTOL

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    probe = torch.arange(1, 33).unsqueeze(0)
    logits = {}
    for name, adapter in (("fsdp", out), ("single", single_run.out)):
        base = AutoModelForCausalLM.from_pretrained(str(launch_demo["model"]))
        model = PeftModel.from_pretrained(base, str(adapter)).eval()
        with torch.no_grad():
            logits[name] = model(input_ids=probe).logits
    assert (logits["fsdp"] - logits["single"]).abs().max() < 1e-4


def test_fsdp2_nf4_two_processes_equal_one(nf4_fsdp, nf4_single):
    info = nf4_fsdp.run_info()
    assert info["world_size"] == 2 and info["engine"] == "FSDP2" and info["quant_method"] == "nf4", info
    assert "4-bit weights stored as float32 (--bnb_4bit_quant_storage) so FSDP2 can shard them" in nf4_fsdp.text
    assert_ranks_identical(nf4_fsdp, 2)
    assert_sharded(nf4_fsdp, 2)  # the packed 4-bit weights too: stored as float32, they shard
    # rank 0 alone read the checkpoint; rank 1 built the skeleton it was sent and received its shards
    assert [d["from_pretrained_calls"] for _, d in sorted(rank_dumps(nf4_fsdp).items())] == [1, 0]
    assert "tensors of the base loaded on rank 0 reached their shards on every rank" in nf4_fsdp.text
    np.testing.assert_allclose(nf4_fsdp.losses(), nf4_single.losses(), rtol=NF4_LOSS_RTOL)
    assert relative_adapter_diff(nf4_fsdp, nf4_single) <= 1e-2


def test_fsdp2_resume_from_a_mid_run_checkpoint_equals_the_uninterrupted_run(launch_demo, runs_dir, nf4_fsdp):
    out = runs_dir / "fsdp2_nf4_resumed"
    out.mkdir()
    shutil.copytree(nf4_fsdp.out / "checkpoint-2", out / "checkpoint-2")
    run = launch("qlora_ds.sh", fsdp_args(launch_demo, out, GLOBAL_BATCH // 2, *CHECKPOINTED,
                                          "--resume_from_checkpoint", "auto"),
                 out, env=base_env(NPROC_PER_NODE=2)).check()
    assert "Resuming from" in run.text and "checkpoint-2" in run.text
    assert max_abs_diff(run.adapter(), nf4_fsdp.adapter()) == 0.0
    assert run.losses()[-2:] == nf4_fsdp.losses()[-2:]
