"""What quantized weights really cost: stored bits per parameter, quantization state included.

`model.get_memory_footprint()` leaves out the bitsandbytes quant state (absmax, nested
statistics, code tables); this counts every tensor a Linear4bit needs to dequantize.
"""
from __future__ import annotations

import torch


def _state_tensors(quant_state) -> list[torch.Tensor]:
    tensors = [v for v in vars(quant_state).values() if torch.is_tensor(v)]
    nested = getattr(quant_state, "state2", None)
    if nested is not None:
        tensors += _state_tensors(nested)
    return tensors


def linear4bit_storage(module) -> dict:
    """Bytes and bits/param of one bnb Linear4bit: packed weights + all quantization state."""
    weight = module.weight
    quant_state = weight.quant_state
    params = int(torch.Size(quant_state.shape).numel())
    stored = getattr(weight, "ds_numel", None) or weight.numel()  # ZeRO-3 leaves an empty placeholder
    weight_bytes = stored * weight.element_size()
    state_bytes = sum(t.numel() * t.element_size() for t in _state_tensors(quant_state))
    return {
        "shape": list(quant_state.shape),
        "params": params,
        "weight_bytes": weight_bytes,
        "state_bytes": state_bytes,
        "bits_per_param": 8 * (weight_bytes + state_bytes) / params,
        "double_quant": bool(getattr(quant_state, "nested", False)),
        "blocksize": quant_state.blocksize,
    }


def quantized_storage(model: torch.nn.Module) -> dict:
    """Summed storage of every bnb 4-bit layer in a model."""
    import bitsandbytes as bnb

    layers = [linear4bit_storage(m) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    params = sum(layer["params"] for layer in layers)
    stored = sum(layer["weight_bytes"] + layer["state_bytes"] for layer in layers)
    out = {
        "layers": len(layers),
        "params": params,
        "bytes": stored,
        "bits_per_param": 8 * stored / params if params else None,
        "largest_layer_bits_per_param": max(layers, key=lambda x: x["params"])["bits_per_param"] if layers else None,
    }
    experts = packed_experts_storage(model)
    if experts["stacks"]:
        out["experts"] = experts
    return out


def packed_experts_storage(model: torch.nn.Module) -> dict:
    """Stored bytes of an MoE's packed 4-bit experts (qlaunch.model.experts_4bit): one parameter per stack,
    codes and statistics inside it."""
    from qlaunch.model.experts_4bit import packed_parameters

    stacks = packed_parameters(model)
    params = sum(layout.experts * layout.values for _, _, layout in stacks)
    stored = 0
    for module, name, _ in stacks:
        p = module._parameters[name]
        stored += (getattr(p, "ds_numel", None) or _global_numel(p)) * p.element_size()
    return {"stacks": len(stacks), "params": params, "bytes": stored,
            "bits_per_param": 8 * stored / params if params else None}


def _global_numel(p: torch.Tensor) -> int:
    return int(torch.Size(p.shape).numel())  # a DTensor shard's shape is the whole tensor's


def storage_text(quant_method: str, storage: dict) -> str:
    text = (f"{quant_method.upper()} base: {storage['layers']} 4-bit layers, {storage['bits_per_param']:.3f} stored "
            "bits/param (weights + quantization state; the fixed per-tensor state dominates on small layers)")
    experts = storage.get("experts")
    if experts:
        text += (f"; {experts['stacks']} packed expert stacks, {experts['params']:,} parameters, "
                 f"{experts['bits_per_param']:.3f} stored bits/param")
    return text
