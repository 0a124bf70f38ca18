"""ZeRO-3 with a 4-bit base: partition the model before DeepSpeed's engine places it.

DeepSpeed's engine moves a model that is not partitioned yet to the GPU whole (`module.to(device)` in
DeepSpeedEngine._configure_distributed_model) and partitions it afterwards, and transformers never builds
a quantized model under `deepspeed.zero.Init`. So a 4-bit base under ZeRO-3 sat whole on every GPU while
loading: Llama-3-70B NF4 needs ~35 GB there before ZeRO-3 saves anything.

Here the base is built in host memory on rank 0 only (qlaunch.model.rank0_load: the other ranks hold a
skeleton of meta parameters) and handed to `deepspeed.zero.Init(module=...)` — the same conversion the
engine runs itself — which takes one parameter at a time to the device, broadcasts it from rank 0 and keeps
this rank's partition. The engine then sees a partitioned model and leaves placement alone, so no device
ever holds more than its partitions plus one parameter. What the engine would have done first to an
unpartitioned model is done here: parameters cast to its compute dtype, buffers and bitsandbytes'
quantization states moved to the device.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("qlaunch")


def engine_param_dtype(ds_config: dict) -> torch.dtype | None:
    """The dtype DeepSpeed's engine casts parameters to (DeepSpeedEngine._mixed_precision_dtypes), from a
    config whose "auto" values the Trainer has filled; None when it keeps them as they are."""
    def enabled(block: str) -> bool:
        return str((ds_config.get(block) or {}).get("enabled", False)).lower() == "true"

    if enabled("fp16"):
        return torch.float16
    if enabled("bf16") or enabled("bfloat16"):
        return torch.bfloat16
    return None


def _one_at_a_time(model: nn.Module, dtype: torch.dtype | None, device: torch.device):
    """The model's parameters, each made ready just before zero.Init takes it: a meta parameter (a rank that
    loaded nothing) is replaced, in every module that holds it (tied weights), by an empty twin of the same
    class and attributes on the device, which the broadcast from rank 0 fills; a floating one is cast as the
    engine would (deepspeed.runtime.engine.CASTABLE_DTYPES)."""
    from deepspeed.runtime.engine import CASTABLE_DTYPES

    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module, attr))
    for param in nn.Module.parameters(model):
        if hasattr(param, "ds_id"):  # already partitioned (a tied weight seen again): zero.Init skips it too
            yield param
            continue
        target = dtype if dtype is not None and param.dtype in CASTABLE_DTYPES else param.dtype
        if param.device.type == "meta":  # a meta tensor cannot take real data in place: a twin replaces it
            twin = torch.Tensor._make_subclass(type(param), torch.empty(param.shape, dtype=target, device=device),
                                               param.requires_grad)
            twin.__dict__.update(param.__dict__)  # Params4bit keeps its quantization state, blocksize, ...
            for module, attr in owners.get(id(param), ()):
                module._parameters[attr] = twin
            param = twin
        elif param.dtype != target:
            param.data = param.data.to(target)
        yield param


def move_unpartitioned_state(model: nn.Module, device: torch.device) -> int:
    """Buffers (never partitioned by ZeRO) and bitsandbytes' quantization states to the device, which the
    engine's `module.to(device)` did before. Returns how many tensors/states moved."""
    moved = 0
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[key] = buffer.to(device)
                moved += 1
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
        if state is not None and hasattr(state, "to"):
            state.to(device)  # in place: the weight and its module share the one object
            moved += 1
    return moved


def partition_for_zero3(model: nn.Module, ds_config: dict, device: torch.device) -> int:
    """Partition every parameter of `model` across the ranks with ZeRO-3 (collective: every rank calls it
    with the same modules). Returns the number of parameters partitioned."""
    import deepspeed

    dtype = engine_param_dtype(ds_config)
    move_unpartitioned_state(model, device)
    count = sum(1 for p in model.parameters() if not hasattr(p, "ds_id"))
    # zero.Init(module=...) walks model.parameters() once, moving each to the device, broadcasting and
    # partitioning it: shadowing the method on this instance makes each parameter ready just in time.
    model.parameters = lambda recurse=True: _one_at_a_time(model, dtype, device)
    try:
        deepspeed.zero.Init(module=model, config_dict_or_path=ds_config, dtype=dtype)
    finally:
        del model.parameters
    log.info("ZeRO-3: %d parameters partitioned across %d ranks as they left rank 0's host memory.",
             count, torch.distributed.get_world_size())
    return count
