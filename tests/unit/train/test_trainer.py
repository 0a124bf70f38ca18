"""End to end on CPU: LoRA / NF4 Q-LoRA on the demo model, adapter save + reload."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from qlaunch.cli import fit, prepare

FAST = ["--max_steps", "30", "--learning_rate", "3e-3", "--per_device_train_batch_size", "8", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--model_max_length", "128", "--lora_r", "8",
        "--lora_alpha", "16", "--lora_dropout", "0", "--disable_tqdm", "True", "--seed", "7"]


def train(demo, out, *extra):
    config = prepare(["--model_name_or_path", demo["model"], "--data_path", demo["train"],
                      "--output_dir", str(out), *FAST, *extra])
    return fit(config).trainer


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def logits_of(model, tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Opposite of hot?"}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def lora_run(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    return train(demo, out, "--use_lora"), out


def test_lora_loss_decreases_and_outputs_written(lora_run):
    trainer, out = lora_run
    history = losses(trainer)
    assert len(history) == 30
    assert sum(history[-5:]) / 5 < 0.7 * sum(history[:5]) / 5
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "metrics.json",
                 "loss_curve.png", "run_info.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["last_loss"] < metrics["first_loss"]
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 1 and info["quant_method"] is None and info["trust_remote_code"] is False
    assert info["lora_target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_only_lora_trained_base_unchanged(lora_run, demo):
    trainer, out = lora_run
    base = load_file(os.path.join(demo["model"], "model.safetensors"))
    state = {k: v for k, v in trainer.model.named_parameters()}
    checked = 0
    for name, param in state.items():
        if "lora_" in name:
            assert param.requires_grad
            continue
        assert not param.requires_grad, name
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(param.detach(), base[key]), key
        checked += 1
    assert checked == len(base)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero; training moved it


def test_adapter_reload_gives_identical_logits(lora_run, demo):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer, out = lora_run
    tokenizer = trainer.processing_class
    trained = logits_of(trainer.model, tokenizer)
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo["model"]), str(out))
    reloaded = logits_of(fresh, tokenizer)
    assert torch.equal(trained, reloaded)
    plain = logits_of(AutoModelForCausalLM.from_pretrained(demo["model"]), tokenizer)
    assert not torch.allclose(plain, reloaded)


def test_lora_weight_path_really_continues(lora_run, demo, tmp_path):
    _, first = lora_run
    trainer = train(demo, tmp_path, "--use_lora", "--lora_weight_path", str(first), "--max_steps", "1",
                    "--learning_rate", "0")
    before = load_file(str(first / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.model.peft_config["default"].r == 8


def test_qwen_lora_single_gpu_flags_run(demo, tmp_path):
    """Qwen's finetune_lora_single_gpu.sh flags (minus --deepspeed), shortened with --max_steps."""
    config = prepare([
        "--model_name_or_path", demo["model"], "--data_path", demo["train"], "--bf16", "True",
        "--output_dir", str(tmp_path), "--num_train_epochs", "5", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "1", "--gradient_accumulation_steps", "8", "--evaluation_strategy", "no",
        "--save_strategy", "steps", "--save_steps", "1000", "--save_total_limit", "10", "--learning_rate", "3e-4",
        "--weight_decay", "0.1", "--adam_beta2", "0.95", "--warmup_ratio", "0.01", "--lr_scheduler_type", "cosine",
        "--logging_steps", "1", "--report_to", "none", "--model_max_length", "512", "--lazy_preprocess", "True",
        "--gradient_checkpointing", "--use_lora", "--max_steps", "2", "--disable_tqdm", "True",
    ])
    trainer = fit(config).trainer
    assert trainer.state.global_step == 2
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_nf4_qlora_trains(demo, tmp_path):
    import bitsandbytes as bnb

    trainer = train(demo, tmp_path, "--q_lora")
    base = trainer.model.base_model.model
    projections = [m for n, m in base.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"))]
    assert len(projections) == 14
    for layer in projections:
        inner = layer.base_layer
        assert isinstance(inner, bnb.nn.Linear4bit)
        assert inner.weight.dtype == torch.uint8 and inner.weight.quant_state is not None
        assert inner.weight.quant_state.quant_type == "nf4"
        assert inner.weight.quant_state.nested  # double quantization
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    history = losses(trainer)
    assert sum(history[-5:]) / 5 < 0.7 * sum(history[:5]) / 5
    assert json.loads((tmp_path / "run_info.json").read_text())["quant_method"] == "nf4"


def test_fp4_and_modules_to_save(demo, tmp_path):
    """--quantization fp4 really stores FP4; --lora_modules_to_save trains and saves lm_head in full."""
    import bitsandbytes as bnb

    trainer = train(demo, tmp_path, "--q_lora", "--quantization", "fp4", "--max_steps", "3",
                    "--lora_modules_to_save", "lm_head")
    layers = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.quant_state.quant_type == "fp4" for m in layers)
    adapter = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert any("lm_head" in k and "lora_" not in k for k in adapter)


def test_run_report_has_throughput_memory_and_lr_axis(lora_run):
    import matplotlib.image

    from qlaunch.train.report import loss_figure

    trainer, out = lora_run
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("real_tokens_seen", "trained_tokens_seen", "real_tokens_per_second", "wall_time_seconds",
                "peak_memory_gib", "config_hash", "plan_estimate_gib"):
        assert metrics.get(key) is not None, key
    # 30 steps x 8 samples: the real tokens are the attention mask's ones, trained ones the labels'
    assert 0 < metrics["trained_tokens_seen"] < metrics["real_tokens_seen"] == trainer.state.num_input_tokens_seen
    assert metrics["peak_memory_kind"] == "process peak RSS" and metrics["peak_memory_gib"] > 0.1
    assert len(metrics["config_hash"]) == 16
    image = matplotlib.image.imread(str(out / "loss_curve.png"))
    assert image.ndim == 3 and image.shape[0] > 100
    fig = loss_figure(trainer.state.log_history, "t")
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "learning rate"


def test_report_to_tensorboard_writes_the_loss_events(demo, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "out"  # transformers 5: OUTPUT/runs/<time_host>, or $TENSORBOARD_LOGGING_DIR
    trainer = train(demo, logs, "--use_lora", "--max_steps", "3", "--report_to", "tensorboard")
    events = [os.path.join(d, f) for d, _, files in os.walk(logs) for f in files if f.startswith("events.out")]
    assert events, f"no tensorboard event file under {logs}"
    accumulator = EventAccumulator(os.path.dirname(events[0]))
    accumulator.Reload()
    losses = [e.value for e in accumulator.Scalars("train/loss")]
    assert losses == pytest.approx(losses_of := [h["loss"] for h in trainer.state.log_history if "loss" in h], rel=1e-5)
    assert len(losses_of) == 3


def test_the_fsdp_plugin_is_restored_only_where_accelerate_drops_it():
    """accelerate sets up FSDP itself for accelerator worlds; only a CPU world (MULTI_CPU) loses the plugin."""
    from qlaunch.train.fsdp import fsdp_plugin_dropped

    assert fsdp_plugin_dropped("MULTI_CPU", True)
    for gpu_world in ("MULTI_GPU", "FSDP", "MULTI_XPU", "MULTI_NPU"):
        assert not fsdp_plugin_dropped(gpu_world, True)
    assert not fsdp_plugin_dropped("MULTI_CPU", False)  # no FSDP asked for: DDP stays
