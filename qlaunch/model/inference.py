"""Load a trained adapter for inference on its base, loaded the way it was trained."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import torch

from qlaunch.config.errors import UsageError

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


REMOTE_CODE = (
    "{what} {path!r} runs code shipped with the checkpoint ({why}): pass --trust_remote_code "
    "if you trust it (the run that trained this adapter did)."
)


def remote_code_problem(base: str, adapter: str | None, trust_remote_code: bool) -> str | None:
    """Why loading needs --trust_remote_code and it was not given, checked before any weights load."""
    if trust_remote_code:
        return None
    if adapter and read_run_info(adapter).get("trust_remote_code"):
        return REMOTE_CODE.format(what="the base of adapter", path=adapter,
                                  why="its run_info.json records trust_remote_code")
    config_path = os.path.join(base, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            config = json.load(f)
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if config.get("auto_map"):
            return REMOTE_CODE.format(what="the model", path=base, why="its config.json has auto_map")
        if config.get("model_type") not in CONFIG_MAPPING:
            return REMOTE_CODE.format(what="the model", path=base,
                                      why=f"model_type {config.get('model_type')!r} is not built into transformers")
    return None


def dequantized_weight(module) -> torch.Tensor | None:
    """The [out_features, in_features] float weight a quantized linear computes with, or None."""
    weight = getattr(module, "weight", None)
    if weight is not None and weight.__class__.__name__ == "Params4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if hasattr(module, "qweight") and hasattr(module, "dequantize_weight"):
        w = module.dequantize_weight().float()
        return w.t() if w.shape == (module.in_features, module.out_features) else w
    return None


def inference_dtype(quant: str | None, machine) -> torch.dtype:
    if not machine.cuda:
        return torch.float32
    if quant == "gptq":
        return torch.float16
    return torch.bfloat16 if machine.bf16 else torch.float16  # by capability: V100/T4 emulate bf16 slowly


def load_for_inference(
    base: str | None = None,
    adapter: str | None = None,
    quantization: str | None = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
):
    """Return (model, tokenizer) in eval mode.

    The base comes from --base, else from the adapter's adapter_config.json. With
    quantization "auto" the base is loaded as the adapter was trained (run_info.json
    records nf4 / fp4 / gptq / none).
    """
    from qlaunch.config.checkpoint import checkpoint_quant_method
    from qlaunch.model.load import load_tokenizer, quantization_config

    if base is None:
        if adapter is None:
            raise UsageError("pass --base MODEL, --adapter DIR, or both.")
        base = adapter_base(adapter)
    problem = remote_code_problem(base, adapter, trust_remote_code)
    if problem:
        raise UsageError(problem)
    info = read_run_info(adapter) if adapter else {}
    if quantization == "auto":
        quant = info.get("quant_method")
        if quant is None and checkpoint_quant_method(base, trust_remote_code) == "gptq":
            quant = "gptq"
    else:
        quant = None if quantization in (None, "none") else quantization

    from qlaunch.config.machine import CPU, Machine

    machine = CPU if device == "cpu" else Machine.detect()
    cuda = machine.cuda
    dtype = dtype or inference_dtype(quant, machine)
    lora_args = SimpleNamespace(
        bnb_4bit_use_double_quant=info.get("bnb_4bit_use_double_quant", True),
        bnb_4bit_quant_storage=None,
    )
    from transformers import AutoModelForCausalLM

    # An MoE's fused experts, 4-bit as in training (qlaunch.model.experts_4bit): the base is built in host
    # memory, where bitsandbytes leaves them 16-bit, and each stack is packed on the device
    experts_4bit = quant in ("nf4", "fp4") and has_fused_experts(base, trust_remote_code)
    kwargs = {"dtype": dtype, "device_map": {"": 0 if cuda and not experts_4bit else "cpu"},
              "trust_remote_code": trust_remote_code}
    # A GPTQ checkpoint's own quantization_config loads it with gptqmodel's fastest inference kernel.
    qc = None if quant == "gptq" else quantization_config(quant, dtype, lora_args)
    if quant == "gptq":
        from qlaunch.model.gptq import prepare_gptqmodel

        prepare_gptqmodel()
    if qc is not None:
        kwargs["quantization_config"] = qc
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if experts_4bit:
        from qlaunch.config.engine import Engine
        from qlaunch.model.load import experts_placement, quantize_fused_experts

        quantize_fused_experts(model, quant, lora_args.bnb_4bit_use_double_quant, dtype,
                               experts_placement(cuda, Engine()))
    tokenizer = load_tokenizer(adapter if adapter and _has_tokenizer(adapter) else base, trust_remote_code)
    if adapter:
        from peft import PeftModel

        from qlaunch.model.lora import peft_over_packed_experts

        model = peft_over_packed_experts(model, lambda: PeftModel.from_pretrained(model, adapter))
    model.eval()
    return model, tokenizer


def has_fused_experts(base: str, trust_remote_code: bool = False) -> bool:
    """Whether the base is an MoE whose experts transformers builds as fused 3-D parameters (meta skeleton)."""
    from qlaunch.config.checkpoint import read_config
    from qlaunch.config.moe import experts_of

    try:
        config = read_config(base)
    except UsageError:  # from_pretrained reports an unreadable base in its own words
        return False
    experts = experts_of(base, config, trust_remote_code)  # None without building anything for a dense base
    return bool(experts and experts.fused_tensors)


def adapter_tokenizer(adapter: str, base: str, trust_remote_code: bool = False):
    """The tokenizer saved with the adapter (its chat template as trained), else the base's."""
    from qlaunch.model.load import load_tokenizer

    return load_tokenizer(adapter if _has_tokenizer(adapter) else base, trust_remote_code)


def _has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def reply(model, tokenizer, messages, *, max_new_tokens: int = 256, temperature: float = 0.0,
          stream: bool = False) -> str:
    """The model's reply to a conversation (greedy when temperature is 0), optionally streamed to stdout."""
    from transformers import TextStreamer

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    device = next(model.parameters()).device
    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
            **sampling,
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
