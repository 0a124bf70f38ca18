"""DeepSpeed through the launch scripts on CPU: ZeRO-2/3 with 2 processes, single-process runs
without MPI, offload configs, and a Qwen finetune_qlora_ds.sh-style invocation.

The DeepSpeed ops are JIT-compiled on first use (~1 min for the shm comm op, ~2 min for
cpu_adam on 2 cores); the `deepspeed_ops` fixture runs .ci/prebuild_deepspeed.sh first so
that cost lands in TORCH_EXTENSIONS_DIR (reused by later runs) and not in a test's timeout.
"""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from launchkit import (
    DS_CONFIGS,
    GLOBAL_BATCH,
    REPO,
    TINY,
    base_env,
    deepspeed_available,
    free_port,
    launch,
    max_abs_diff,
)
from test_fsdp import rank_dumps
from test_torchrun import assert_ranks_identical

pytestmark = [pytest.mark.integration, pytest.mark.deepspeed]

WEIGHT_ATOL = 1e-4
LOSS_RTOL = 1e-4


@pytest.fixture(scope="session")
def deepspeed_ops():
    reason = deepspeed_available()
    if reason:
        pytest.skip(reason)
    r = subprocess.run(["bash", str(REPO / ".ci" / "prebuild_deepspeed.sh"), "shm_comm", "cpu_adam"],
                       env=base_env(), capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"prebuild_deepspeed.sh failed:\n{r.stdout}\n{r.stderr}"
    return r.stderr


def ds_args(demo, out, config: str | None, batch: int, *extra: str) -> list[str]:
    ds = ["--deepspeed", str(DS_CONFIGS / config)] if config else []
    return [*ds, "-m", str(demo["model"]), "-d", str(demo["data"]), "-o", str(out), "--", *TINY,
            "--per_device_train_batch_size", str(batch), *extra]


def compare(run, ref, what: str, atol: float = WEIGHT_ATOL, rtol: float = LOSS_RTOL) -> float:
    diff = max_abs_diff(run.adapter(), ref.adapter())
    print(f"{what}: max |adapter diff| = {diff:.3g}; losses {run.losses()} vs {ref.losses()}")
    np.testing.assert_allclose(run.losses(), ref.losses(), rtol=rtol, err_msg=f"{what}: losses")
    assert diff <= atol, f"{what}: adapter differs from the reference by {diff} (> {atol})"
    return diff


@pytest.mark.parametrize("config", ["zero2.json", "zero3.json"])
def test_zero_two_processes_match_ddp(config, deepspeed_ops, launch_demo, runs_dir, ddp_run):
    out = runs_dir / f"ds2_{config.split('.')[0]}"
    run = launch("lora_ds.sh", ds_args(launch_demo, out, config, GLOBAL_BATCH // 2),
                 out, env=base_env(NPROC_PER_NODE=2)).check()
    info = run.run_info()
    assert info["world_size"] == 2 and info["deepspeed"] is True, info
    cfg = json.loads((DS_CONFIGS / config).read_text())
    assert cfg["zero_optimization"]["stage"] in (2, 3)
    assert "World size 2" in run.text
    assert_ranks_identical(run, 2)
    adapter = run.adapter()
    assert adapter and all(t.numel() > 0 for t in adapter.values()), "empty tensors in the saved adapter"
    compare(run, ddp_run, f"DeepSpeed {config} 2 procs vs DDP")


@pytest.mark.parametrize("config", ["zero2.json", "zero3.json"])
def test_single_process_deepspeed_without_mpi4py(config, deepspeed_ops, launch_demo, runs_dir, single_run):
    """World size 1 + DeepSpeed: the script runs python directly with RANK/WORLD_SIZE/MASTER_*
    on 127.0.0.1, so DeepSpeed never needs mpi4py (made unimportable here)."""
    out = runs_dir / f"ds1_{config.split('.')[0]}"
    run = launch("lora_ds.sh", ds_args(launch_demo, out, config, GLOBAL_BATCH), out,
                 env=base_env(NPROC_PER_NODE=1), block_mpi4py=True).check()
    assert "torch.distributed.run" not in run.text
    assert "mpi4py" not in run.text.replace("blocked by qlaunch", ""), run.tail()
    info = run.run_info()
    assert info["world_size"] == 1 and info["deepspeed"] is True
    compare(run, single_run, f"DeepSpeed {config} 1 proc vs plain 1 proc")


def test_deepspeed_steps_read_nothing_back(deepspeed_ops, launch_demo, runs_dir):
    """DeepSpeed ZeRO-2, one process: steps that neither log nor save read no tensor back to the host
    (tests/integration/_hooks/count_readbacks). transformers reads DeepSpeed's gradient norm with .item()
    after every optimizer step; qlaunch keeps it a tensor until a log reads it (DeviceGradNormMixin)."""
    out = runs_dir / "ds1_readbacks"
    counts = runs_dir / "ds1_readbacks.jsonl"
    tiny = list(TINY)
    tiny[tiny.index("--logging_steps") + 1] = "100"
    tiny[tiny.index("--max_steps") + 1] = "6"
    run = launch("lora_ds.sh", ["--deepspeed", str(DS_CONFIGS / "zero2.json"), "-m", str(launch_demo["model"]),
                                "-d", str(launch_demo["data"]), "-o", str(out), "--", *tiny,
                                "--per_device_train_batch_size", "2"],
                 out, env={**base_env(NPROC_PER_NODE=1), "QLAUNCH_TEST_READBACK_LOG": str(counts)},
                 dump=False, hooks=("count_readbacks",)).check()
    assert run.run_info()["deepspeed"] is True
    (record,) = [json.loads(line) for line in counts.read_text().splitlines()]
    assert record["steps"] == 5, record  # steps 2-6 (the first may set things up; no step logs or saves)
    assert record["calls"] == {}, record


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero2_offload.json", "zero3_offload.json"])
def test_offload_configs_two_processes(config, deepspeed_ops, launch_demo, runs_dir, ddp_run):
    """Offload configs use DeepSpeedCPUAdam (their optimizer block): same math as AdamW, so the
    result stays close to the DDP run (not bitwise: a different kernel)."""
    out = runs_dir / f"ds2_{config.split('.')[0]}"
    run = launch("lora_ds.sh", ds_args(launch_demo, out, config, GLOBAL_BATCH // 2), out,
                 env=base_env(NPROC_PER_NODE=2)).check()
    assert run.run_info()["world_size"] == 2
    assert_ranks_identical(run, 2)
    compare(run, ddp_run, f"DeepSpeed {config} 2 procs vs DDP", atol=1e-3, rtol=1e-3)


def test_qwen_style_qlora_ds_invocation(deepspeed_ops, launch_demo, runs_dir):
    """Like Qwen's finetune_qlora_ds.sh: env GPUS_PER_NODE/NNODES/NODE_RANK/MASTER_ADDR/
    MASTER_PORT and `bash launch/qlora_ds.sh -m MODEL -d DATA` (NF4 Q-LoRA, ZeRO-2 default)."""
    out = runs_dir / "qwen_style_qlora_ds"
    env = base_env(GPUS_PER_NODE=2, NNODES=1, NODE_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    run = launch("qlora_ds.sh", ["-m", str(launch_demo["model"]), "-d", str(launch_demo["data"]),
                                 "-o", str(out), "--", *TINY, "--per_device_train_batch_size", "1"],
                 out, env=env).check()
    assert "--nproc_per_node=2" in run.text and "zero2.json" in run.text
    info = run.run_info()
    assert info["world_size"] == 2 and info["deepspeed"] is True
    assert info["quant_method"] == "nf4", info
    assert_ranks_identical(run, 2)
    assert run.adapter()
    losses = run.losses()
    assert len(losses) == 4 and all(np.isfinite(losses))


def test_nf4_qlora_zero3_two_processes_matches_nf4_ddp(deepspeed_ops, launch_demo, runs_dir):
    """Q-LoRA + ZeRO-3 works: the 4-bit weights are stored in the compute dtype (set by finetune.py)
    so ZeRO-3 can shard them; the gathered adapter equals the NF4 DDP run's."""
    runs = {}
    for name, config in (("ddp", "none"), ("zero3", str(DS_CONFIGS / "zero3.json"))):
        out = runs_dir / f"nf4_{name}"
        runs[name] = launch("qlora_ds.sh", ["--deepspeed", config, "-m", str(launch_demo["model"]), "-d",
                                            str(launch_demo["data"]), "-o", str(out), "--", *TINY,
                                            "--per_device_train_batch_size", "1"],
                            out, env=base_env(NPROC_PER_NODE=2)).check()
    zero3 = runs["zero3"]
    info = zero3.run_info()
    assert info["world_size"] == 2 and info["quant_method"] == "nf4" and info["deepspeed"] is True
    assert info["quantized_storage"]["layers"] == 14
    assert "4-bit weights stored as float32" in zero3.text
    # rank 0 alone read the checkpoint; zero.Init partitioned it before the engine could place it whole
    assert "ZeRO-3: " in zero3.text and "parameters partitioned across 2 ranks" in zero3.text
    assert [d["from_pretrained_calls"] for _, d in sorted(rank_dumps(zero3).items())] == [1, 0]
    adapter = zero3.adapter()
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    compare(zero3, runs["ddp"], "NF4 ZeRO-3 2 procs vs NF4 DDP 2 procs")
