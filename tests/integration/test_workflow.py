"""The whole adapter lifecycle of Qwen's guide, as a user runs it, on the tiny demo model (CPU):

LoRA → merge → quantize the merged model to GPTQ Int4 (training data as calibration) → Q-LoRA on the
Int4 model with launch/qlora_single_gpu.sh → qlaunch.chat with the new adapter → merge that adapter too.
Every stage is the real command in its own process; each asserts what it must.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from launchkit import REPO, base_env, launch

pytestmark = [pytest.mark.integration, pytest.mark.gptq, pytest.mark.slow]

# The LoRA stage stops early (loss still ~2.5) so the Q-LoRA stage has visibly more to learn.
LORA_STEPS, QLORA_STEPS = 12, 24
TRAIN = [
    "--model_max_length", "64", "--per_device_train_batch_size", "4",
    "--gradient_accumulation_steps", "1", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0",
    "--learning_rate", "3e-3", "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--save_strategy", "no",
    "--logging_steps", "1", "--seed", "42", "--data_seed", "42", "--report_to", "none",
    "--activation_checkpointing", "False",
]
PROMPT = "What is the opposite of hot?"


def python_m(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=str(REPO), env=base_env(),
                       capture_output=True, text=True, timeout=timeout)
    sys.stderr.write(f"[workflow] {time.monotonic() - start:6.1f} s  rc={r.returncode}  -m {module}\n")
    assert r.returncode == 0, f"python -m {module} exited {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def assert_loss_falls(losses: list[float], steps: int, factor: float) -> None:
    assert len(losses) == steps
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4  # means of 4 steps: batches differ by ~0.15
    assert last < factor * first, losses


def merge_report(path) -> dict:
    return json.loads((path / "merge_report.json").read_text())


def test_lora_merge_quantize_qlora_chat_merge(launch_demo, tmp_path):
    pytest.importorskip("gptqmodel")
    model, data = launch_demo["model"], launch_demo["data"]

    # 1. LoRA on the full-precision demo model.
    lora = launch("lora_single_gpu.sh", ["-m", str(model), "-d", str(data), "-o", str(tmp_path / "lora"),
                                         "--", *TRAIN, "--max_steps", str(LORA_STEPS)], tmp_path / "lora", dump=False).check()
    assert_loss_falls(lora.losses(), LORA_STEPS, 0.7)

    # 2. Merge it: a LoRA merge saved in float32 is exact up to summation order (≥ 99.9% top-1).
    python_m("qlaunch.merge", "--adapter", tmp_path / "lora", "--out", tmp_path / "merged")
    report = merge_report(tmp_path / "merged")
    assert report["within_tolerance"] and report["top1_agreement"] >= 0.999, report

    # 3. Quantize the merged model to GPTQ Int4, calibrated on the training data.
    python_m("qlaunch.quantize", "--model", tmp_path / "merged", "--data", data, "--out", tmp_path / "int4",
             "--num_samples", "32")
    qc = json.loads((tmp_path / "int4" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["checkpoint_format"]) == ("gptq", 4, "gptq")

    # 4. Q-LoRA on the Int4 model with the one-GPU launcher (the checkpoint's own config selects GPTQ).
    qlora = launch("qlora_single_gpu.sh", ["-m", str(tmp_path / "int4"), "-d", str(data),
                                           "-o", str(tmp_path / "qlora"), "--", *TRAIN, "--max_steps", str(QLORA_STEPS)],
                   tmp_path / "qlora", dump=False).check()
    assert qlora.run_info()["quant_method"] == "gptq"
    assert_loss_falls(qlora.losses(), QLORA_STEPS, 0.85)

    # 5. Chat with the new adapter: the command's reply equals in-process generation.
    chat = python_m("qlaunch.chat", "--adapter", tmp_path / "qlora", "--prompt", PROMPT, "--max_new_tokens", "16")
    from qlaunch.model.inference import load_for_inference, reply

    adapter_model, tokenizer = load_for_inference(adapter=str(tmp_path / "qlora"), device="cpu")
    assert any(hasattr(m, "qweight") for m in adapter_model.modules())  # the GPTQ base, as trained
    expected = reply(adapter_model, tokenizer, [{"role": "system", "content": "You are a helpful assistant."},
                                                {"role": "user", "content": PROMPT}], max_new_tokens=16)
    del adapter_model
    assert expected and chat.stdout.strip() == expected

    # 6. Merge the Q-LoRA adapter into the dequantized GPTQ weights (≥ 99% top-1).
    python_m("qlaunch.merge", "--adapter", tmp_path / "qlora", "--out", tmp_path / "merged_qlora")
    report = merge_report(tmp_path / "merged_qlora")
    assert report["merged_into"] == "dequantized gptq"
    assert report["within_tolerance"] and report["top1_agreement"] >= 0.99, report
