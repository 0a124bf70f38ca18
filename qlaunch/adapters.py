"""Load a trained adapter for inference on its base, loaded the way it was trained."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import torch

from qlaunch.errors import UsageError

RUN_INFO = "run_info.json"


def read_run_info(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, RUN_INFO)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


def adapter_base(adapter_dir: str) -> str:
    path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(path):
        raise UsageError(f"--adapter: no adapter_config.json in {adapter_dir!r}; pass a LoRA run's --output_dir.")
    with open(path) as f:
        return json.load(f)["base_model_name_or_path"]


def load_for_inference(
    base: str | None = None,
    adapter: str | None = None,
    quantization: str | None = "auto",
    device: str | None = None,
):
    """Return (model, tokenizer) in eval mode.

    The base comes from --base, else from the adapter's adapter_config.json. With
    quantization "auto" the base is loaded as the adapter was trained (run_info.json
    records nf4 / fp4 / gptq / none).
    """
    from qlaunch.model import checkpoint_quant_method, load_tokenizer, quantization_config

    if base is None:
        if adapter is None:
            raise UsageError("pass --base MODEL, --adapter DIR, or both.")
        base = adapter_base(adapter)
    info = read_run_info(adapter) if adapter else {}
    if quantization == "auto":
        quant = info.get("quant_method")
        if quant is None and checkpoint_quant_method(base) == "gptq":
            quant = "gptq"
    else:
        quant = None if quantization in (None, "none") else quantization

    cuda = torch.cuda.is_available() and device != "cpu"
    if quant == "gptq":
        dtype = torch.float16 if cuda else torch.float32
    elif cuda:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32
    lora_args = SimpleNamespace(
        bnb_4bit_use_double_quant=info.get("bnb_4bit_use_double_quant", True),
        bnb_4bit_quant_storage=None,
    )
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype, "device_map": {"": 0 if cuda else "cpu"}}
    # A GPTQ checkpoint's own quantization_config loads it with gptqmodel's fastest inference kernel.
    qc = None if quant == "gptq" else quantization_config(quant, dtype, lora_args)
    if qc is not None:
        kwargs["quantization_config"] = qc
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    tokenizer = load_tokenizer(adapter if adapter and _has_tokenizer(adapter) else base)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, tokenizer


def _has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
