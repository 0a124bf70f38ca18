"""GPU-only checks of the 4-bit MoE experts (qlaunch.model.experts_4bit), on a CUDA device (skipped without one):

- the base is built in host memory and each fused expert stack is packed on the GPU, then the rest follows:
  after loading every parameter is on the GPU and the packed stacks are 4.13 bits per expert parameter;
- a bf16 NF4 Q-LoRA run with LoRA on the experts trains, and its logits stay near the 16-bit model's;
- its adapter loads for inference the same way (qlaunch.model.inference);
- backward dequantizes each expert again (qlaunch.model.recompute_saved): between forward and backward the GPU
  holds less than with the dequantized matrices kept, by at least the matrices forward read.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

FAST = ["--max_steps", "3", "--learning_rate", "1e-2", "--per_device_train_batch_size", "4", "--save_strategy", "no",
        "--report_to", "none", "--model_max_length", "64", "--lora_dropout", "0", "--disable_tqdm", "True",
        "--bf16", "True"]
EXPERTS = ["--lora_target_parameters", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def test_4bit_experts_are_packed_on_the_gpu_and_train(demo, tmp_path):
    from transformers import AutoModelForCausalLM

    from qlaunch.cli import fit, prepare
    from qlaunch.model.experts_4bit import packed_parameters
    from tests.moe_models import build_moe

    path = build_moe("qwen3_moe", str(tmp_path / "moe"), demo["model"])
    outcome = fit(prepare(["--model_name_or_path", path, "--data_path", demo["train"], "--output_dir",
                           str(tmp_path / "out"), "--q_lora", *EXPERTS, *FAST]))
    assert outcome.status == "done", outcome.message
    model = outcome.trainer.model.eval()
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    packed = packed_parameters(model)
    values = sum(layout.experts * layout.values for _, _, layout in packed)
    stored = sum(m._parameters[n].numel() * m._parameters[n].element_size() for m, n, _ in packed)
    assert len(packed) == 4 and 4.1 < stored * 8 / values < 4.2
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    ids = torch.arange(5, 30, device="cuda").unsqueeze(0)
    with torch.no_grad(), model.disable_adapter():
        quantized = model(input_ids=ids).logits.float()
    with torch.no_grad():
        exact = plain(input_ids=ids).logits.float()
    assert (exact - quantized).abs().mean() < 0.1 * exact.abs().mean()
    # chat / evaluate load the same way: host memory first, stacks packed on the GPU, everything there after
    from qlaunch.model.inference import load_for_inference

    reloaded, _ = load_for_inference(adapter=str(tmp_path / "out"), dtype=torch.bfloat16)
    assert {p.device.type for p in reloaded.parameters()} == {"cuda"} and len(packed_parameters(reloaded)) == 4


def test_backward_keeps_no_dequantized_expert_on_the_gpu(demo, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import qlaunch.model.recompute_saved as recompute_saved
    from qlaunch.model.experts_4bit import quantize_experts
    from qlaunch.model.lora import peft_over_packed_experts
    from tests.moe_models import build_moe

    path = build_moe("qwen3_moe", str(tmp_path / "moe"), demo["model"])
    read = []
    remember = recompute_saved.RebuildInBackward.remember
    monkeypatch.setattr(recompute_saved.RebuildInBackward, "remember",
                        lambda self, matrix, build: (read.append(matrix.nbytes), remember(self, matrix, build)))

    def held_after_forward(rebuild: bool) -> int:
        with monkeypatch.context() as patch:
            if not rebuild:
                patch.setattr(recompute_saved, "_outer_hooks", lambda: None)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
            quantize_experts(model, "nf4", True, torch.bfloat16, "cuda")
            model.cuda()
            lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"],
                              target_parameters=EXPERTS[1:])
            model = peft_over_packed_experts(model, lambda: get_peft_model(model, lora))
            ids = torch.arange(5, 69, device="cuda").unsqueeze(0)
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            read.clear()
            loss = model(input_ids=ids, labels=ids).loss
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated() - before
            loss.backward()
            return held

    kept_all, held = held_after_forward(False), held_after_forward(True)
    assert sum(read) > 0 and kept_all - held >= 0.9 * sum(read), (kept_all, held, sum(read))
