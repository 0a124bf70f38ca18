"""The memory plan against the measured peak RSS of real CPU training runs: within ±25%.

finetune.py runs 2 steps in its own process (ru_maxrss is its own) and writes the measured peak
beside the plan's estimate into metrics.json. The plan counts live memory, so the runs use a fixed
glibc mmap threshold (bench/plan_vs_rss.py explains why: with glibc's default, memory freed by
activations stays in the process and RSS is not the peak of live memory). Cases: a ~100M-parameter
random Llama with LoRA r64 at several lengths, with and without activation checkpointing.
bench/plan_vs_rss.py also runs NF4 Q-LoRA and the demo model; neither is asserted here. NF4 at
1024 tokens measures 0.82x: the fp32 checkpoint stays mapped — transformers memory-maps the
safetensors file, and the mapping outlives the quantization (most likely held by the tensors it
does not quantize — embeddings, norms — zero-copy views into it; not traced further), so every
page read at load stays in RSS as clean, reclaimable file-backed memory (RssFile 482 MiB of 1201
at the peak; the LoRA run's fp32 weights are those same pages, which is why it matches). Too thin
a margin for the next point. The demo's plan is 99% the CPU process baseline (0.6 GiB), and the identical demo run measured 0.53-0.90 GiB on this machine
(in and out of the full suite), which moves with how much of the shared libraries a process has
mapped (file-backed pages count in RSS): an environment fact, not a term of the model.
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
    ("random-100M", 256, ["--use_lora", "--lora_r", "64"]),
    ("random-100M", 1024, ["--use_lora", "--lora_r", "64"]),
    ("random-100M", 512, ["--use_lora", "--lora_r", "64", "--activation_checkpointing", "True"]),
    ("random-100M", 1024, ["--use_lora", "--lora_r", "64", "--activation_checkpointing", "True"]),
    ("random-100M", 2048, ["--use_lora", "--lora_r", "64", "--activation_checkpointing", "True"]),
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
