"""The memory plan against the measured peak RSS of real CPU training runs: within ±25%.

finetune.py runs 2 steps in its own process (ru_maxrss is its own) and writes the measured peak
beside the plan's estimate into metrics.json. The plan counts live memory, so the runs use a fixed
glibc mmap threshold (bench/plan_vs_rss.py explains why: with glibc's default, memory freed by
activations stays in the process and RSS is not the peak of live memory). Cases: the demo model's
NF4 recipe, and a ~100M-parameter random Llama with LoRA r64 at two lengths, with and without
activation checkpointing, and NF4 Q-LoRA. bench/plan_vs_rss.py runs more lengths.
"""
import importlib.util
import json
import os

import pytest

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("plan_vs_rss", os.path.join(REPO, "bench", "plan_vs_rss.py"))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

CASES = [
    ("demo", 128, ["--config", os.path.join(REPO, "recipes", "demo-qlora.yaml")]),
    ("random-100M", 256, ["--use_lora", "--lora_r", "64"]),
    ("random-100M", 1024, ["--use_lora", "--lora_r", "64"]),
    ("random-100M", 1024, ["--use_lora", "--lora_r", "64", "--activation_checkpointing", "True"]),
    ("random-100M", 1024, ["--q_lora", "--quantization", "nf4", "--activation_checkpointing", "True"]),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return bench.build_models(str(tmp_path_factory.mktemp("rss_models")))


@pytest.mark.parametrize("model, length, extra", CASES, ids=[f"{m}-{n}-{'-'.join(e[:1] + e[-1:])}"
                                                             for m, n, e in CASES])
def test_plan_within_25_percent_of_measured_peak_rss(models, tmp_path, model, length, extra):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(bench.long_records(8, 6 * length)))
    result = bench.run(models[model], str(data), str(tmp_path / "run"), length, extra, returned=True)
    ratio = result["planned_gib"] / result["measured_gib"]
    print(f"{model} {length} {' '.join(extra)}: planned {result['planned_gib']:.2f} GiB, "
          f"measured {result['measured_gib']:.2f} GiB, ratio {ratio:.2f}")
    assert 0.75 <= ratio <= 1.25
