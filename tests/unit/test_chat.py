"""python -m qlaunch.chat answers with a trained NF4 adapter; the adapter loads with plain peft too."""
import os
import subprocess
import sys

import pytest
import torch

from qlaunch.cli import fit, prepare
from tests.conftest import REPO


@pytest.fixture(scope="module")
def nf4_adapter(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("nf4_adapter")
    config = prepare(["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir", str(out),
                      "--config", os.path.join(REPO, "recipes", "demo-qlora.yaml"), "--num_train_epochs", "8",
                      "--disable_tqdm", "True"])
    fit(config)
    return str(out)


def test_chat_cli_answers_a_prompt_as_trained_model_would(nf4_adapter):
    from qlaunch.model.inference import load_for_inference, reply

    result = subprocess.run([sys.executable, "-m", "qlaunch.chat", "--adapter", nf4_adapter, "--prompt",
                             "What is the opposite of hot?", "--max_new_tokens", "24"],
                            capture_output=True, text=True, cwd=REPO, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    model, tokenizer = load_for_inference(adapter=nf4_adapter)
    import bitsandbytes as bnb
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())  # base loaded as trained: NF4
    expected = reply(model, tokenizer, [{"role": "system", "content": "You are a helpful assistant."},
                                        {"role": "user", "content": "What is the opposite of hot?"}],
                     max_new_tokens=24)
    assert expected and result.stdout.strip() == expected
    assert expected.startswith("The opposite of")  # learned the answer format in 8 epochs


def test_auto_peft_model_loads_the_adapter(nf4_adapter):
    from peft import AutoPeftModelForCausalLM
    from transformers import BitsAndBytesConfig

    from qlaunch.model.inference import load_for_inference

    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
    peft_model = AutoPeftModelForCausalLM.from_pretrained(nf4_adapter, quantization_config=bnb_config,
                                                          device_map={"": "cpu"}).eval()
    ours, tokenizer = load_for_inference(adapter=nf4_adapter)
    ids = tokenizer("<|im_start|>user\nOpposite of up?<|im_end|>\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, ours(input_ids=ids).logits)


def test_chat_bad_adapter_dir_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "qlaunch.chat", "--adapter", str(tmp_path), "--prompt", "hi"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2 and "no adapter_config.json" in result.stderr and "Traceback" not in result.stderr


def test_q_lora_without_bitsandbytes_gives_install_command(demo, monkeypatch):
    import importlib.util

    from qlaunch.config.arguments import parse_namespace
    from qlaunch.config.machine import CPU
    from qlaunch.config.validate import validate_args

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    ns = parse_namespace(["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--q_lora"])
    problems = validate_args(ns, machine=CPU)
    assert problems == ["--q_lora with nf4 needs bitsandbytes, not installed: "
                        "pip install 'qlaunch[bnb]'  (or: pip install 'bitsandbytes>=0.48')"]
