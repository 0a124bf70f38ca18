"""The memory model against Qwen's published single-GPU measurements (A100-80G, batch 1, gradient
accumulation 8, flash-attention 2, gradient checkpointing, LoRA r64 on c_attn c_proj w1 w2, Qwen's
adamw_torch): every cell within ±15%. Nothing in qlaunch.memory is fitted to these numbers.

Known misses (strict xfail, so a fix shows up): the Int4 runs at short lengths measure 2-4.5 GB more
than every term the model counts (the same model is within 15% for the bf16 LoRA runs and for the
Int4 runs from 1024-2048 tokens on); see the README's planning section.
"""
import os

import pytest

from qlaunch.memory.fit import HEADROOM, planned
from qlaunch.plan import prepare_plan
from tests.conftest import REPO
from tests.model_dims import config_dir

LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
PUBLISHED_GB = {
    ("Qwen/Qwen-7B-Chat-Int4", "qlora"): (11.5, 11.5, 12.3, 13.9, 16.9, 23.5),
    ("Qwen/Qwen-14B-Chat-Int4", "qlora"): (18.7, 18.4, 18.9, 19.9, 23.0, 27.9),
    ("Qwen/Qwen-7B", "lora"): (20.1, 20.4, 21.5, 23.8, 29.7, 36.6),
    ("Qwen/Qwen-14B", "lora"): (34.6, 35.1, 35.3, 37.4, 42.5, 55.2),
}
# Qwen-72B-Chat-Int4 Q-LoRA, the same profiling setup, published at two lengths only (the N = 1 check of the
# sharded GPTQ plans in tests/unit/test_plan.py)
PUBLISHED_72B_INT4_GB = {256: 61.4, 8192: 75.6}
KNOWN_MISSES = {("Qwen/Qwen-7B-Chat-Int4", 256), ("Qwen/Qwen-7B-Chat-Int4", 512), ("Qwen/Qwen-14B-Chat-Int4", 256),
                ("Qwen/Qwen-14B-Chat-Int4", 512), ("Qwen/Qwen-14B-Chat-Int4", 1024)}


def cells():
    for (model, method), values in PUBLISHED_GB.items():
        for length, gb in zip(LENGTHS, values):
            marks = [pytest.mark.xfail(strict=True, reason="Int4 short-length cells: see module docstring")] \
                if (model, length) in KNOWN_MISSES else []
            yield pytest.param(model, method, length, gb, marks=marks, id=f"{model.split('/')[1]}-{length}")
    for length, gb in PUBLISHED_72B_INT4_GB.items():
        yield pytest.param("Qwen/Qwen-72B-Chat-Int4", "qlora", length, gb, id=f"Qwen-72B-Chat-Int4-{length}")


@pytest.mark.parametrize("model, method, length, published", cells())
def test_published_qwen_memory(tmp_path_factory, model, method, length, published):
    path = config_dir(model, str(tmp_path_factory.mktemp("cfg")))
    argv = ["--model_name_or_path", path, "--use_lora", "--lora_r", "64", "--lora_dropout", "0.05",
            "--lora_target_modules", "c_attn", "c_proj", "w1", "w2", "--per_device_train_batch_size", "1",
            "--gradient_accumulation_steps", "8", "--model_max_length", str(length), "--gradient_checkpointing",
            "--attn_implementation", "flash_attention_2", "--optim", "adamw_torch", "--gpu", "A100-80GB",
            "--labelled_logits_only", "False"]  # Qwen's finetune.py computes logits at every position
    argv += ["--q_lora", "--fp16", "True"] if method == "qlora" else ["--bf16", "True"]
    ns, settings, target, stats, _ = prepare_plan(argv)
    gb = planned(ns, settings, target, stats)["memory_gb"]["per_device_peak"]
    print(f"{model} {length}: planned {gb:.1f} GB, published {published} GB, ratio {gb / published:.2f}")
    assert abs(gb / published - 1) <= 0.15


def test_published_fsdp_qlora_70b_on_two_24gb_gpus(tmp_path):
    """Answer.AI's FSDP + QLoRA benchmark (github.com/AnswerDotAI/fsdp_qlora, benchmarks_03_2024.md, dual
    RTX 4090 and dual 3090): Llama-2 70B, QLoRA, CPU offload, batch 2, context 2048, gradient checkpointing,
    LoRA r64 on q k v gate up down, bf16: peak memory 14.92 GiB per GPU (torch's reserved memory, which
    does not include the CUDA context). Planned under FSDP2 + CPU offload for the same job: within ±15%."""
    path = config_dir("meta-llama/Llama-2-70b-hf", str(tmp_path))
    argv = ["--model_name_or_path", path, "--q_lora", "--fsdp_config", os.path.join(REPO, "fsdp_configs", "fsdp2_offload.json"),
            "--gpu", "RTX-4090", "--num_gpus", "2", "--per_device_train_batch_size", "2", "--model_max_length", "2048",
            "--lora_r", "64", "--lora_alpha", "16", "--lora_target_modules", "q_proj", "k_proj", "v_proj", "up_proj",
            "down_proj", "gate_proj", "--gradient_checkpointing", "--bf16", "True", "--labelled_logits_only", "False"]
    ns, settings, target, stats, _ = prepare_plan(argv)
    plan = planned(ns, settings, target, stats)["memory_gb"]
    gb = plan["per_device_peak"] - plan["persistent"]["CUDA context"]
    print(f"Llama-2 70B FSDP2 + offload, 2x RTX 4090: planned {gb:.2f} GiB, published 14.92 GiB, "
          f"ratio {gb / 14.92:.3f}")
    assert abs(gb / 14.92 - 1) <= 0.15


# Answer.AI's table of Llama-2 70B QLoRA runs at context 2048 "on select accelerators" (benchmarks_03_2024.md,
# "Recommendations for Different Hardware Configurations"): each (GPU, count, CPU offload, batch) trained, so a
# plan for the same job under FSDP2 must not refuse it. No memory is published for these rows: only that they ran.
PUBLISHED_70B_RUNS = [("A100-40GB", 2, False, 1), ("A100-40GB", 4, False, 4), ("A100-40GB", 8, False, 4),
                      ("H100-80GB", 4, False, 8), ("RTX-A6000", 2, False, 2), ("RTX-A6000", 4, False, 3),
                      ("A5000-24GB", 2, True, 2), ("A5000-24GB", 4, False, 1), ("A5000-24GB", 8, False, 1)]
# The plan refuses one of them: 41.2 GB planned against 40 GB. Strict, so a better activation model shows up.
PLANNED_OVER = {("A100-40GB", 4, False, 4)}


@pytest.mark.parametrize("gpu,count,offload,batch", [
    pytest.param(*row, id="-".join(map(str, row)),
                 marks=[pytest.mark.xfail(strict=True, reason="planned above the GPU")] if row in PLANNED_OVER else [])
    for row in PUBLISHED_70B_RUNS])
def test_published_fsdp_qlora_70b_runs_are_planned_to_fit(gpu, count, offload, batch, tmp_path):
    """(The A6000 rows were A6000 Ada 48 GB: planned as RTX-A6000, also 48 GB; the A5000 as 24 GB, cc 8.6.)"""
    path = config_dir("meta-llama/Llama-2-70b-hf", str(tmp_path))
    device = (["--gpu_memory_gb", "24", "--gpu_capability", "8.6"] if gpu == "A5000-24GB" else ["--gpu", gpu])
    config = "fsdp2_offload.json" if offload else "fsdp2.json"
    argv = ["--model_name_or_path", path, "--q_lora", "--fsdp_config", os.path.join(REPO, "fsdp_configs", config),
            *device, "--num_gpus", str(count), "--per_device_train_batch_size", str(batch), "--model_max_length",
            "2048", "--lora_r", "64", "--lora_alpha", "16", "--lora_target_modules", "q_proj", "k_proj", "v_proj",
            "up_proj", "down_proj", "gate_proj", "--gradient_checkpointing", "--bf16", "True",
            "--labelled_logits_only", "False"]
    ns, settings, target, stats, _ = prepare_plan(argv)
    plan = planned(ns, settings, target, stats)
    peak, limit = plan["memory_gb"]["per_device_peak"], target.memory_bytes / 2**30
    print(f"Llama-2 70B QLoRA {count}x {gpu} batch {batch}{' + offload' if offload else ''}: planned {peak:.1f} of "
          f"{limit:.1f} GB")
    assert peak <= limit * HEADROOM, (peak, limit)
