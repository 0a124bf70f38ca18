"""Parameter counts of a 4-bit base: what transformers counts, whatever the 4-bit storage dtype."""
from __future__ import annotations

import math

import pytest
import torch


@pytest.mark.parametrize("storage", [None, torch.bfloat16, torch.float32])
def test_a_4bit_base_counts_the_weights_it_stands_for(demo, storage):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlaunch.model.lora import count_parameters

    full = AutoModelForCausalLM.from_pretrained(demo["model"])
    kwargs = {"bnb_4bit_quant_storage": storage} if storage else {}
    nf4 = AutoModelForCausalLM.from_pretrained(
        demo["model"], device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32, **kwargs))
    packed = sum(p.numel() for p in nf4.parameters())
    assert packed < full.num_parameters()  # the raw numel undercounts: 1/2 (uint8) or 1/4, 1/8 of the weights
    for p in nf4.parameters():
        p.requires_grad_(False)
    assert count_parameters(nf4) == (0, full.num_parameters()) == (0, nf4.num_parameters())
    nf4.lm_head.weight.requires_grad_(True)
    assert count_parameters(nf4)[0] == nf4.lm_head.weight.numel()


def lora_args(demo, out, *extra):
    return ["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir", str(out),
            "--max_steps", "3", "--learning_rate", "1e-3", "--per_device_train_batch_size", "4", "--lora_r", "8",
            "--lora_alpha", "16", "--lora_dropout", "0", "--model_max_length", "64", "--save_strategy", "no",
            "--report_to", "none", "--logging_steps", "1", "--disable_tqdm", "True", *extra]


def reload_logit_diff(trained_model, adapter_dir, model_dir: str) -> float:
    """Max |logit difference| between the trained model and its saved adapter loaded with plain peft on a fresh
    NF4 (double quant, fp32 compute) base, the way a user of the adapter would load it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = AutoModelForCausalLM.from_pretrained(
        model_dir, device_map={"": "cpu"}, dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    reloaded = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ids = torch.arange(5, 37).unsqueeze(0)
    with torch.no_grad():
        return (reloaded(input_ids=ids).logits - trained_model.eval()(input_ids=ids).logits).abs().max().item()


def test_dora_and_rslora_on_nf4_train_save_and_reload_with_plain_peft(demo, tmp_path):
    """peft's own options end to end (issue 21): the adapter says DoRA + rsLoRA, the magnitudes trained,
    and a fresh NF4 base with the saved adapter gives the trained model's logits."""
    import json

    from qlaunch.cli import fit, prepare

    out = tmp_path / "dora"
    outcome = fit(prepare(lora_args(demo, out, "--q_lora", "--use_dora", "True", "--use_rslora", "True",
                                    "--init_lora_weights", "gaussian")))
    assert outcome.status == "done", outcome.message
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True and config["init_lora_weights"] == "gaussian"
    model = outcome.trainer.model
    scalings = {m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)}
    assert scalings == {16 / math.sqrt(8)}  # rsLoRA: alpha / sqrt(r), not alpha / r
    magnitudes = {n: p for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    assert magnitudes and all(p.requires_grad for p in magnitudes.values())
    assert reload_logit_diff(model, out, demo["model"]) <= 1e-4

    # merged into the dequantized NF4 weights, with merge's own proof (magnitudes folded in by peft)
    from qlaunch.merge import merge

    info = merge(str(out), str(tmp_path / "merged"))
    report = info["report"]
    assert info["merged_into"] == "dequantized nf4" and report["within_tolerance"], report
    assert report["max_abs_logit_diff"] < 1e-3


def test_loraplus_gives_the_b_matrices_ratio_times_the_learning_rate(demo, tmp_path):
    from qlaunch.cli import load_model, prepare
    from qlaunch.model.load import load_tokenizer
    from qlaunch.train.trainer import build_trainer

    config = prepare(lora_args(demo, tmp_path / "plus", "--use_lora", "--loraplus_lr_ratio", "16",
                               "--weight_decay", "0.01"))
    model, _ = load_model(config)
    trainer = build_trainer(config, model, load_tokenizer(demo["model"]), [])
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    rates = {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}
    a = {n: lr for n, lr in rates.items() if "lora_A" in n}
    b = {n: lr for n, lr in rates.items() if "lora_B" in n}
    assert a and b and len(a) == len(b) and len(rates) == sum(p.requires_grad for p in model.parameters())
    assert set(a.values()) == {1e-3} and set(b.values()) == {16e-3}
    # the optimizer --optim names, with its own arguments: LoRA+ changes the rates only
    optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, model)
    assert type(optimizer) is optimizer_cls and optimizer.defaults["eps"] == kwargs["eps"]


def test_variants_peft_cannot_do_here_are_refused_before_loading(demo, tmp_path):
    import os

    from qlaunch.cli import prepare
    from qlaunch.config.errors import UsageError
    from tests.conftest import REPO
    from tests.model_dims import config_dir

    def problems(*argv):
        try:
            prepare(list(argv))
        except UsageError as e:
            return " ".join(e.problems)
        return ""

    gptq = config_dir("Qwen/Qwen-7B-Chat-Int4", str(tmp_path))
    assert "peft has no DoRA layer for GPTQ" in problems(
        "--model_name_or_path", gptq, "--data_path", demo["train"], "--q_lora", "--use_dora", "True",
        "--trust_remote_code", "True", "--dry_run", "True")
    assert "--init_lora_weights pissa: not supported yet" in problems(*lora_args(demo, tmp_path / "p", "--use_lora",
                                                                                 "--init_lora_weights", "pissa"))
    assert "without LoRA+'s learning-rate groups" in problems(*lora_args(
        demo, tmp_path / "d", "--use_lora", "--loraplus_lr_ratio", "16", "--deepspeed",
        os.path.join(REPO, "ds_configs", "zero2_offload.json")))
    assert "--use_dora has no effect without --use_lora" in problems(*lora_args(demo, tmp_path / "n", "--use_dora",
                                                                                "True"))


def test_the_plan_counts_dora_s_magnitudes_exactly_and_its_weight_norm_workspace(demo, tmp_path):
    """DoRA adds one trained magnitude per output of every adapted layer; the plan's count equals the
    real model's, and its backward holds one layer's whole weight three times (dequantized, B @ A, sum)."""
    import json
    import subprocess
    import sys

    from qlaunch.cli import load_model, prepare
    from tests.conftest import REPO

    def plan(*extra):
        argv = [sys.executable, "-m", "qlaunch.plan", "--model_name_or_path", demo["model"], "--q_lora",
                "--lora_r", "8", "--json", *extra]
        return json.loads(subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=True).stdout)

    lora, dora = plan(), plan("--use_dora", "True")
    model, _ = load_model(prepare(lora_args(demo, tmp_path / "o", "--q_lora", "--use_dora", "True")))
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert dora["trainable_parameters"] == real > lora["trainable_parameters"]
    assert dora["memory_gb"]["phases"]["block backward"] > lora["memory_gb"]["phases"]["block backward"]
