"""The memory plan's counts are exact against a real model; --dry_run prints it."""
from qlaunch.cli import prepare
from qlaunch.plan import format_plan, memory_plan


def test_plan_counts_match_the_real_model(demo, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = prepare(["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir",
                      str(tmp_path), "--q_lora", "--lora_r", "8"])
    plan = memory_plan(config)
    model = AutoModelForCausalLM.from_pretrained(demo["model"])
    assert plan["parameters"] == sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                        "gate_proj", "up_proj", "down_proj"]))
    assert plan["trainable_parameters"] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert plan["base_weights_gib"] < plan["parameters"] * 4 / 1024**3  # 4-bit projections
    assert "Memory plan" in format_plan(plan)
