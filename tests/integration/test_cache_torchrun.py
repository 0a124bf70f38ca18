"""The tokenized-data cache under 2-process torchrun: one process builds it, the other maps it,
and a second job tokenizes nothing. Which process tokenized is logged by a test hook
(_hooks/count_tokenize) that wraps the function the build maps over, in every process."""
from __future__ import annotations

import json

import pytest
from launchkit import GLOBAL_BATCH, HOOKS, TINY, base_env, launch

pytestmark = [pytest.mark.integration, pytest.mark.torchrun]


def tokenized_by(log) -> dict[str, int]:
    """{rank: conversations tokenized} from the hook's log (absent file: nothing tokenized)."""
    counts: dict[str, int] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            rank, _pid, n = line.split()
            counts[rank] = counts.get(rank, 0) + int(n)
    return counts


def test_only_one_process_builds_the_cache_and_a_second_job_tokenizes_nothing(launch_demo, runs_dir):
    cache_dir = runs_dir / "tokenized-cache"
    samples = len(json.loads(launch_demo["data"].read_text()))
    results = []
    for job in ("first", "second"):
        log = runs_dir / f"cache-{job}.tokenized"
        env = base_env(NPROC_PER_NODE=2, PYTHONPATH=str(HOOKS / "count_tokenize"), QLAUNCH_TEST_TOKENIZE_LOG=log)
        run = launch("lora_ds.sh", ["--deepspeed", "none", "-m", str(launch_demo["model"]),
                                    "-d", str(launch_demo["data"]), "-o", str(runs_dir / f"cache-{job}"), "--",
                                    *TINY, "--per_device_train_batch_size", str(GLOBAL_BATCH // 2),
                                    "--cache_dir", str(cache_dir)],
                     runs_dir / f"cache-{job}", env=env, dump=False).check()
        assert run.run_info()["world_size"] == 2, run.tail()
        results.append((run, tokenized_by(log)))
    (first, first_counts), (second, second_counts) = results
    assert first_counts == {"0": samples}, f"tokenized per rank: {first_counts}\n{first.tail()}"
    assert "tokenized data reused" not in first.text
    assert second_counts == {}, f"the second job tokenized: {second_counts}\n{second.tail()}"
    assert "tokenized data reused from" in second.text
    assert len([p for p in cache_dir.iterdir() if not p.name.startswith(".")]) == 1
    assert second.losses() == first.losses()  # the same data, from the cache
