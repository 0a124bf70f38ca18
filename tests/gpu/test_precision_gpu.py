"""GPU-only checks of issue 24's precision items, on a CUDA device (skipped without one):

- item 6: the labelled-logits path equals the full-logits path under bf16 autocast for every allowed type;
- item 1: a bf16 run keeps trainables fp32, so an update below bf16's resolution survives;
- item 7: a real bf16 training run passes its final read-back (probe logits within tolerance, tensors exact);
- item 2: a preemption stop inside a step resumes like the uninterrupted run (the GPU's random state too).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tests", "unit", "train"))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_labelled_logits_equal_the_full_path_under_bf16_autocast(packed):
    from test_loss import batches, loss_and_grads, tiny_lora_model

    from qlaunch.train.loss import LABELLED_LOGITS_MODEL_TYPES

    for arch in sorted(LABELLED_LOGITS_MODEL_TYPES):
        model = tiny_lora_model(arch).cuda()
        batch = {k: v.cuda() for k, v in batches(packed).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            full, full_grads = loss_and_grads(model, batch, labelled_only=False)
            part, part_grads = loss_and_grads(model, batch, labelled_only=True)
        torch.testing.assert_close(part.loss.float(), full.loss.float(), rtol=2e-2, atol=0)
        for name in full_grads:
            torch.testing.assert_close(part_grads[name], full_grads[name], rtol=5e-2, atol=1e-4, msg=name)


def test_bf16_trainables_stay_fp32_and_keep_small_updates(demo):
    from transformers import AutoModelForCausalLM

    from qlaunch.config.arguments import parse_namespace
    from qlaunch.model.lora import attach_lora, upcast_trainables

    model = AutoModelForCausalLM.from_pretrained(demo["model"], dtype=torch.bfloat16).cuda()
    lora = parse_namespace(["--use_lora", "--lora_r", "4", "--lora_modules_to_save", "lm_head"])
    model = attach_lora(model, lora, quant_method=None, gradient_checkpointing=False)
    assert upcast_trainables(model) > 0
    [copy] = [p for n, p in model.named_parameters() if "modules_to_save" in n and p.requires_grad]
    with torch.no_grad():
        copy.fill_(1.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    ids = torch.arange(1, 17, device="cuda").unsqueeze(0)
    for _ in range(10):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert copy.dtype == torch.float32 and ((copy - 1).abs() > 5e-4).float().mean() > 0.5


def test_a_bf16_run_passes_its_read_back_on_the_gpu(demo, tmp_path):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("needs bf16")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "finetune.py", "--model_name_or_path", demo["model"], "--data_path",
                           demo["train"], "--use_lora", "--bf16", "True", "--output_dir", str(out), "--max_steps", "3",
                           "--report_to", "none", "--lora_modules_to_save", "lm_head"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "does not match the trained model" not in proc.stderr
    assert (out / "adapter_model.safetensors").exists()


def test_a_stop_inside_a_step_resumes_like_the_uninterrupted_run_on_the_gpu(demo, tmp_path, monkeypatch):
    """Item 2 on a CUDA device: the random state put back at a micro-step stop includes the GPU's, which
    draws the dropout masks (a stop without it would differ by far more than the tolerance)."""
    import signal

    from safetensors.torch import load_file
    from test_resume import SignalInsideStep, args

    from qlaunch.cli import fit, prepare

    monkeypatch.setenv("QLAUNCH_SIGNAL_LEAD", "0")
    accumulating = ("--max_steps", "5", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4",
                    "--lora_dropout", "0.3", "--fp16", "False", "--bf16", "False", "--precision", "fp32")
    fit(prepare(args(demo, tmp_path / "straight", *accumulating)))
    out = tmp_path / "preempted"
    first = fit(prepare(args(demo, out, *accumulating)), extra_callbacks=[SignalInsideStep(2)])
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    assert first.status == "preempted" and first.step == 2 and "inside step 3" in first.message
    fit(prepare(args(demo, out, *accumulating, "--resume_from_checkpoint", "auto")))
    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)
