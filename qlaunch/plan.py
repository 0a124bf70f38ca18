"""Preflight memory plan: what the base, the adapter and the optimizer will take, per process.

Built from the checkpoint's config on the meta device (no weights are read), so it is exact
for parameter counts and an estimate for activations. Printed by --dry_run.
"""
from __future__ import annotations

import re

import torch

GiB = 1024**3
# Stored bits per parameter of a quantized projection, quantization state included
# (bench/nf4_bits.py: NF4/FP4 with double quant 4.127 at 4096x4096, without 4.5; GPTQ Int4 group 128:
# 4 bits + fp16 scale and packed zero per 128 inputs).
QUANT_BITS = {"nf4": 4.127, "fp4": 4.127, "gptq": 4.0 + (16 + 4) / 128}
QUANT_BITS_NO_DOUBLE = 4.5


def _meta_model(model_name_or_path: str, trust_remote_code: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlaunch.model import unquantized_config

    config = unquantized_config(AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code), config


def memory_plan(config) -> dict:
    """Bytes per process for weights, LoRA, gradients, optimizer state, and an activation estimate."""
    margs, largs, targs = config.model, config.lora, config.training
    model, hf_config = _meta_model(margs.model_name_or_path, margs.trust_remote_code)
    compute_bytes = torch.tensor([], dtype=config.compute_dtype).element_size()
    output = model.get_output_embeddings()

    quantized, other, lora_params = 0, 0, 0
    targets = set(largs.lora_target_modules or [])
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is output or not re.search(r"\.\d+\.", name):
            continue
        quantized += module.weight.numel()
        leaf = name.rsplit(".", 1)[-1]
        if largs.use_lora and (not targets or leaf in targets):
            lora_params += largs.lora_r * (module.in_features + module.out_features)
    total = sum(p.numel() for p in model.parameters())
    other = total - quantized

    if config.quant_method:
        bits = QUANT_BITS[config.quant_method]
        if config.quant_method in ("nf4", "fp4") and not largs.bnb_4bit_use_double_quant:
            bits = QUANT_BITS_NO_DOUBLE
        base = quantized * bits / 8 + other * compute_bytes
    else:
        base = total * compute_bytes
    trainable = lora_params if largs.use_lora else total
    grads = trainable * 4
    optim_name = str(getattr(targs.optim, "value", targs.optim))
    optimizer = trainable * (2 if "8bit" in optim_name else 8)  # AdamW: two fp32 moments (8-bit: two bytes)

    hidden = getattr(hf_config, "hidden_size", 0)
    layers = getattr(hf_config, "num_hidden_layers", 0)
    intermediate = getattr(hf_config, "intermediate_size", 4 * hidden)
    tokens = targs.per_device_train_batch_size * targs.model_max_length
    act_bytes = 2 if config.compute_dtype in (torch.float16, torch.bfloat16) else 4
    if targs.activation_checkpointing:  # one hidden state kept per layer, one layer recomputed at a time
        activations = tokens * act_bytes * (layers * hidden + 4 * hidden + 3 * intermediate)
    else:
        activations = tokens * act_bytes * layers * (16 * hidden + 3 * intermediate)
    vocab = getattr(hf_config, "vocab_size", 0)
    activations += tokens * vocab * 4 * 2  # fp32 logits and their gradient

    plan = {
        "parameters": total,
        "quantized_parameters": quantized if config.quant_method else 0,
        "trainable_parameters": trainable,
        "base_weights_gib": base / GiB,
        "gradients_gib": grads / GiB,
        "optimizer_gib": optimizer / GiB,
        "activations_gib_estimate": activations / GiB,
    }
    plan["total_gib_estimate"] = sum(v for k, v in plan.items() if k.endswith("_gib") or k.endswith("_estimate"))
    return plan


def format_plan(plan: dict) -> str:
    rows = [
        ("base weights", plan["base_weights_gib"]),
        ("LoRA grads" if plan["trainable_parameters"] < plan["parameters"] else "gradients", plan["gradients_gib"]),
        ("optimizer state", plan["optimizer_gib"]),
        ("activations (estimate)", plan["activations_gib_estimate"]),
        ("total per process (estimate)", plan["total_gib_estimate"]),
    ]
    lines = [f"Memory plan: {plan['parameters']:,} parameters, {plan['trainable_parameters']:,} trainable"]
    lines += [f"  {name:30} {gib:8.2f} GiB" for name, gib in rows]
    return "\n".join(lines)
