"""GPTQ Int4 Q-LoRA through gptqmodel, end to end on CPU, on a tiny GPTQ v1 checkpoint made locally."""
import json
import os

import pytest
import torch

gptqmodel = pytest.importorskip("gptqmodel", reason="GPTQ tests need gptqmodel: pip install 'qlaunch[gptq]'")
# no GPTQMODEL_CPU_WORKERS here: qlaunch.model.gptq.prepare_gptqmodel gives gptqmodel its pool on 2 cores

from qlaunch.cli import fit, prepare  # noqa: E402
from qlaunch.config.errors import UsageError

pytestmark = pytest.mark.gptq
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def gptq_model(demo, tmp_path_factory):
    from qlaunch.model.gptq_pack import make_gptq_checkpoint

    return make_gptq_checkpoint(demo["model"], str(tmp_path_factory.mktemp("gptq") / "model"))


def run_args(model, demo, out, *extra):
    return ["--model_name_or_path", model, "--data_path", demo["train"], "--output_dir", str(out), "--q_lora",
            "--max_steps", "30", "--learning_rate", "3e-3", "--per_device_train_batch_size", "8", "--logging_steps",
            "1", "--save_strategy", "no", "--report_to", "none", "--model_max_length", "128", "--lora_r", "8",
            "--lora_alpha", "16", "--lora_dropout", "0", "--disable_tqdm", "True", "--seed", "5", *extra]


@pytest.fixture(scope="module")
def gptq_run(gptq_model, demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq_run")
    return fit(prepare(run_args(gptq_model, demo, out))).trainer, out


def test_auto_detects_gptq_from_the_checkpoint(gptq_model, demo, tmp_path):
    config = prepare(run_args(gptq_model, demo, tmp_path))
    assert config.quant_method == "gptq"


def test_lora_trains_on_gptq_quant_linear(gptq_run):
    trainer, out = gptq_run
    base = trainer.model.base_model.model
    layers = [m for n, m in base.named_modules() if n.endswith(PROJECTIONS)]
    assert len(layers) == 14
    for layer in layers:
        inner = layer.base_layer
        assert type(inner).__module__.startswith("gptqmodel")
        assert inner.qweight.dtype == torch.int32
    assert all("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert json.loads((out / "run_info.json").read_text())["quant_method"] == "gptq"


def test_adapter_reload_on_fresh_gptq_base_reproduces_logits(gptq_run, gptq_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlaunch.model.gptq import gptq_training_config, pin_training_kernels

    trainer, out = gptq_run
    ids = torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    trainer.model.eval()
    with torch.no_grad():
        trained = trainer.model(input_ids=ids).logits
    fresh = AutoModelForCausalLM.from_pretrained(gptq_model, quantization_config=gptq_training_config(),
                                                 device_map={"": "cpu"}, dtype=torch.float32)
    pin_training_kernels(fresh)
    reloaded = PeftModel.from_pretrained(fresh, str(out)).eval()
    with torch.no_grad():
        diff = (reloaded(input_ids=ids).logits - trained).abs().max().item()
    assert diff <= 1e-4


def test_no_grad_eval_probe_before_training_is_guarded(gptq_model):
    """STACK trap: a no-grad eval forward repacks the kernel for inference; we refuse to train on it."""
    from transformers import AutoModelForCausalLM

    from qlaunch.model.gptq import gptq_training_config, pin_training_kernels

    probe = AutoModelForCausalLM.from_pretrained(gptq_model, quantization_config=gptq_training_config(),
                                                 device_map={"": "cpu"}, dtype=torch.float32).eval()
    with torch.no_grad():
        probe(input_ids=torch.tensor([[5, 6, 7]]))
    with pytest.raises(RuntimeError, match="repacked for no-grad inference"):
        pin_training_kernels(probe)


def test_pinned_model_still_has_gradients_after_an_eval_forward(gptq_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qlaunch.model.gptq import gptq_training_config, pin_training_kernels

    model = AutoModelForCausalLM.from_pretrained(gptq_model, quantization_config=gptq_training_config(),
                                                 device_map={"": "cpu"}, dtype=torch.float32)
    pin_training_kernels(model)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=list(PROJECTIONS), lora_dropout=0.0))
    ids = torch.tensor([[5, 6, 7, 8]])
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # an eval probe after pinning
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    # lora_B starts at zero, so A's gradient is zero; B's must not be
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_gptq_refuses_trainable_embeddings(gptq_model, demo, tmp_path):
    with pytest.raises(UsageError, match="GPTQ Int4 Q-LoRA cannot train embeddings or lm_head"):
        prepare(run_args(gptq_model, demo, tmp_path, "--lora_modules_to_save", "embed_tokens", "lm_head"))


def test_gptq_checkpoint_without_q_lora_and_nf4_on_gptq(gptq_model, demo, tmp_path):
    with pytest.raises(UsageError, match="pass --q_lora"):
        prepare(["--model_name_or_path", gptq_model, "--data_path", demo["train"], "--use_lora"])
    with pytest.raises(UsageError, match="already GPTQ-quantized"):
        prepare(run_args(gptq_model, demo, tmp_path, "--quantization", "nf4"))


def test_gptq_flag_on_plain_checkpoint(demo, tmp_path):
    with pytest.raises(UsageError, match="has no GPTQ quantization_config"):
        prepare(run_args(demo["model"], demo, tmp_path, "--quantization", "gptq"))


def test_chat_on_gptq_adapter(gptq_run):
    from qlaunch.model.inference import load_for_inference, reply

    _, out = gptq_run
    model, tokenizer = load_for_inference(adapter=str(out))
    assert any(type(m).__module__.startswith("gptqmodel") for m in model.modules())
    assert reply(model, tokenizer, [{"role": "user", "content": "Opposite of up?"}], max_new_tokens=8)


def test_gptq_without_optimum_gives_install_command(gptq_model, demo, monkeypatch):
    import importlib.util

    from qlaunch.config.arguments import parse_namespace
    from qlaunch.config.machine import CPU
    from qlaunch.config.validate import validate_args

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optimum" else real(name, *a))
    ns = parse_namespace(["--model_name_or_path", gptq_model, "--data_path", demo["train"], "--q_lora"])
    assert validate_args(ns, machine=CPU) == [
        "--q_lora with gptq needs optimum, not installed: pip install 'qlaunch[gptq]'  (or: pip install "
        "'gptqmodel>=7.6' optimum)"]


def test_relative_model_path_is_recorded_absolute(demo, tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(demo["model"]))
    config = prepare(["--model_name_or_path", "model", "--data_path", demo["train"], "--use_lora"])
    assert config.model.model_name_or_path == demo["model"]


def test_the_log_names_each_layer_s_kernel_where_nothing_is_pinned(gptq_model):
    """On CUDA gptqmodel picks Triton/Torch kernels with no mode to pin: the log said "0 quantized layers
    pinned". It names the kernels instead (issue 24 item 5). GPU facts: a layer class without linear_mode."""
    from transformers import AutoModelForCausalLM

    from qlaunch.model.gptq import gptq_training_config, kernel_summary, pin_training_kernels

    model = AutoModelForCausalLM.from_pretrained(gptq_model, quantization_config=gptq_training_config(),
                                                 device_map={"": "cpu"}, dtype=torch.float32)
    layers = [m for m in model.modules() if hasattr(m, "qweight")]
    cpu_kernel = type(layers[0]).__name__
    assert kernel_summary(model) == f"{len(layers)} {cpu_kernel}" and pin_training_kernels(model) == len(layers)

    class TritonV2Linear(torch.nn.Module):  # what a CUDA machine loads: qweight, no linear_mode
        def __init__(self):
            super().__init__()
            self.register_buffer("qweight", torch.zeros(1, dtype=torch.int32))

    gpu_like = torch.nn.Sequential(TritonV2Linear(), TritonV2Linear(), layers[0])
    assert pin_training_kernels(gpu_like) == 1
    parts = sorted([(cpu_kernel, 1), ("TritonV2Linear", 2)])
    assert kernel_summary(gpu_like) == ", ".join(f"{count} {name}" for name, count in parts)
    assert kernel_summary(torch.nn.Linear(2, 2)) == "no quantized layers"


def test_bf16_compute_trains_like_fp16_through_gptqmodel_s_kernel(gptq_model):
    """--bf16 with a GPTQ base (allowed on GPUs with bf16): the trainable kernel dequantizes with its fp16
    scales and computes in the input's dtype. On CPU, the loss and LoRA gradients of a bf16 model agree with
    the fp16 and fp32 ones within bf16's precision."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qlaunch.model.gptq import gptq_training_config, pin_training_kernels

    ids = torch.randint(4, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    results = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(gptq_model, quantization_config=gptq_training_config(),
                                                     device_map={"": "cpu"}, dtype=dtype)
        pin_training_kernels(model)
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, target_modules=list(PROJECTIONS), init_lora_weights="gaussian",
                                                 lora_dropout=0.0))
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grad = torch.cat([p.grad.float().flatten() for n, p in model.named_parameters() if p.requires_grad])
        results[dtype] = (loss.item(), grad)
    loss32, grad32 = results[torch.float32]
    for dtype, (loss, grad) in results.items():
        print(f"{dtype}: loss {loss:.6f} (fp32 {loss32:.6f}), gradient cosine "
              f"{torch.nn.functional.cosine_similarity(grad, grad32, dim=0):.5f}")
        assert abs(loss - loss32) / loss32 < 1e-3
        assert torch.nn.functional.cosine_similarity(grad, grad32, dim=0) > 0.99
    assert abs(results[torch.bfloat16][0] - results[torch.float16][0]) / results[torch.float16][0] < 1e-3
