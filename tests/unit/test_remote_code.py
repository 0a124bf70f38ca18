"""Adapters of remote-code bases (Qwen-7B style): chat / evaluate / merge take --trust_remote_code,
and refuse with the fix, before loading weights, when it is needed and not given."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from qlaunch.config.errors import UsageError
from tests.conftest import REPO

CONFIG_PY = '''from transformers import Qwen2Config


class QLTinyConfig(Qwen2Config):
    model_type = "qltiny"
'''
MODELING_PY = '''from transformers import Qwen2ForCausalLM

from .configuration_qltiny import QLTinyConfig


class QLTinyForCausalLM(Qwen2ForCausalLM):
    config_class = QLTinyConfig
'''


@pytest.fixture(scope="module")
def remote_adapter(demo, tmp_path_factory):
    """A local checkpoint whose classes live in its own .py files (auto_map), and a LoRA adapter on it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("remote")
    base = root / "base"
    shutil.copytree(demo["model"], base)
    (base / "configuration_qltiny.py").write_text(CONFIG_PY)
    (base / "modeling_qltiny.py").write_text(MODELING_PY)
    config = json.loads((base / "config.json").read_text())
    config.update(model_type="qltiny", architectures=["QLTinyForCausalLM"],
                  auto_map={"AutoConfig": "configuration_qltiny.QLTinyConfig",
                            "AutoModelForCausalLM": "modeling_qltiny.QLTinyForCausalLM"})
    (base / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(str(base), trust_remote_code=True)
    assert type(model).__name__ == "QLTinyForCausalLM"
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = root / "adapter"
    peft_model.save_pretrained(str(adapter))
    (adapter / "run_info.json").write_text(json.dumps({"quant_method": None, "trust_remote_code": True}))
    ids = torch.tensor([[5, 9, 13, 21]])
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
    return {"base": str(base), "adapter": str(adapter), "ids": ids, "logits": logits}


def test_refused_with_the_fix_before_loading(remote_adapter):
    from qlaunch.model.inference import load_for_inference

    with pytest.raises(UsageError, match="pass --trust_remote_code if you trust it"):
        load_for_inference(adapter=remote_adapter["adapter"])
    with pytest.raises(UsageError, match="its config.json has auto_map"):
        load_for_inference(base=remote_adapter["base"])


def test_loads_with_the_flag_and_gives_the_trained_logits(remote_adapter):
    from qlaunch.model.inference import load_for_inference

    model, _ = load_for_inference(adapter=remote_adapter["adapter"], trust_remote_code=True)
    with torch.no_grad():
        logits = model(input_ids=remote_adapter["ids"]).logits
    assert torch.allclose(logits, remote_adapter["logits"], atol=1e-5)


def run_tool(module, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)


def test_chat_and_merge_cli(remote_adapter, tmp_path):
    adapter = remote_adapter["adapter"]
    refused = run_tool("qlaunch.chat", "--adapter", adapter, "--prompt", "hi", "--max_new_tokens", "2")
    assert refused.returncode == 2 and "--trust_remote_code" in refused.stderr and "Traceback" not in refused.stderr
    ok = run_tool("qlaunch.chat", "--adapter", adapter, "--prompt", "hi", "--max_new_tokens", "2",
                  "--trust_remote_code")
    assert ok.returncode == 0, ok.stderr[-2000:]
    refused = run_tool("qlaunch.merge", "--adapter", adapter, "--out", str(tmp_path / "m"))
    assert refused.returncode == 2 and "--trust_remote_code" in refused.stderr and not (tmp_path / "m").exists()
    merged = run_tool("qlaunch.merge", "--adapter", adapter, "--out", str(tmp_path / "m"), "--trust_remote_code")
    assert merged.returncode == 0, merged.stderr[-2000:]


def test_inference_dtype_decided_by_capability():
    from qlaunch.config.machine import CPU, gpu
    from qlaunch.model.inference import inference_dtype

    assert inference_dtype(None, gpu((8, 0))) == torch.bfloat16
    assert inference_dtype(None, gpu((7, 0))) == torch.float16  # V100: bf16 only through emulation
    assert inference_dtype("gptq", gpu((9, 0))) == torch.float16
    assert inference_dtype("nf4", CPU) == torch.float32
