"""Decisions and errors per rank, with real torchrun processes on 127.0.0.1.

- Rank 0 chooses the checkpoint to resume from and every rank follows; when a rank cannot see it
  (node-local --output_dir), every rank refuses together: exit 2, one line naming the rank and path.
- An error raised on one rank other than 0 is printed by that rank, named by its rank.
"""
from __future__ import annotations

import json

import pytest
from launchkit import GLOBAL_BATCH, HOOKS, TINY, base_env, finish, free_port, launch

pytestmark = [pytest.mark.integration, pytest.mark.torchrun]


def fake_checkpoint(path) -> None:
    """A complete-looking checkpoint (what newest_complete_checkpoint accepts); never loaded here,
    since every rank refuses before resuming."""
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 2, "max_steps": 4}))
    (path / "adapter_model.safetensors").write_bytes(b"")


def test_node_local_output_dirs_refuse_resume_together_naming_the_rank(launch_demo, runs_dir):
    """Two simulated nodes, each in its own directory, `-o out` relative: node 0's out/ holds
    checkpoint-2, node 1's is empty. Rank 0 resumes from out/checkpoint-2, rank 1 cannot see it."""
    port, procs = free_port(), []
    for node_rank in (0, 1):
        node_dir = runs_dir / f"node_local_{node_rank}"
        node_dir.mkdir()
        if node_rank == 0:
            fake_checkpoint(node_dir / "out" / "checkpoint-2")
        env = base_env(NNODES=2, NODE_RANK=node_rank, NPROC_PER_NODE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(launch("lora_ds.sh", ["--deepspeed", "none", "-m", str(launch_demo["model"]),
                                           "-d", str(launch_demo["data"]), "-o", "out", "--", *TINY,
                                           "--per_device_train_batch_size", str(GLOBAL_BATCH // 2),
                                           "--resume_from_checkpoint", "auto"],
                            node_dir / "out", env=env, dump=False, cwd=node_dir, wait=False,
                            log=runs_dir / f"node_local_{node_rank}.log"))
    runs = [finish(run, proc, timeout=600) for run, proc in procs]
    for run in runs:
        assert run.returncode != 0, run.tail()
        lines = [line for line in run.text.splitlines() if "cannot see" in line]
        assert lines, run.tail()
        assert "rank 1 cannot see 'out/checkpoint-2'" in lines[0], lines
        frames = [line for line in run.text.splitlines() if line.strip().startswith("File ")]
        assert not [f for f in frames if "/qlaunch/" in f], run.tail()  # torchrun's own report only
    assert not (runs_dir / "node_local_1" / "out" / "adapter_model.safetensors").exists()
    assert not (runs_dir / "node_local_0" / "out" / "adapter_model.safetensors").exists()


def test_an_error_on_rank_1_is_printed_with_its_rank(launch_demo, runs_dir):
    env = base_env(NPROC_PER_NODE=2, QLAUNCH_TEST_FAIL_RANK=1, PYTHONPATH=str(HOOKS / "fail_on_rank"))
    out = runs_dir / "fail_rank1"
    run = launch("lora_ds.sh", ["--deepspeed", "none", "-m", str(launch_demo["model"]), "-d", str(launch_demo["data"]),
                                "-o", str(out), "--", *TINY, "--per_device_train_batch_size", "1"],
                 out, env=env, dump=False, timeout=600)
    assert run.returncode != 0, run.tail()
    assert "finetune.py (rank 1 of 2): error: RuntimeError: injected failure on rank 1" in run.text, run.tail()
    assert "injected failure on rank 0" not in run.text
