"""GPTQ Int4 weights that ZeRO-3 and FSDP2 can shard: the packed tensors as frozen float parameters.

gptqmodel keeps a layer's packed weights (`qweight`, `qzeros` int32, `scales` fp16, `g_idx` int32) as
buffers: no engine shards buffers, so every rank holds the whole 4-bit base (DeepSpeed#7096 is still
open; LLaMA-Factory and Qwen refuse GPTQ + ZeRO-3). bitsandbytes solves the same problem for NF4 with
`quant_storage`: the packed bytes live in a parameter of the compute dtype, which the engines shard,
gather and cast like any frozen weight. No library does this for GPTQ, so it is written here:

- each packed buffer becomes one flat frozen parameter `<name>_packed` holding *the same bytes* viewed
  in the compute dtype (padded to a whole element). The compute dtype matters: DeepSpeed casts every
  floating parameter to it at initialization (`module.half()` / `.bfloat16()`) and FSDP2's mixed
  precision casts to it for the all-gather; a cast between different dtypes would change the bytes,
  a "cast" to the dtype they already have changes nothing;
- the layer's class gets properties `qweight`, `qzeros`, `scales`, `g_idx` that view the parameter's
  bytes back as the real dtype and shape whenever the kernel reads them, so they see the gathered
  full tensor inside forward (FSDP2 gathers per unit, ZeRO-3 per module before forward). Outside
  forward, where a rank holds only its shard, they are meta tensors of the right shape and dtype:
  metadata for whoever inspects them, nothing to compute with.

`packed_bytes(model)` returns each layer's tensors as the kernel sees them, to prove the bytes equal
the checkpoint's after sharding and gathering.
"""
from __future__ import annotations

import math

import torch
from torch import nn

PACKED = ("qweight", "qzeros", "scales", "g_idx")
SUFFIX = "_packed"


def is_gptq_layer(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in PACKED) and hasattr(module, "dequantize_weight")


def to_storage(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor`'s bytes as a flat tensor of `dtype`, zero-padded to whole elements (no value changes)."""
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    size = torch.empty((), dtype=dtype).element_size()
    pad = -raw.numel() % size
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad)])
    return raw.view(dtype)


def _nbytes(dtype: torch.dtype, shape: torch.Size) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def from_storage(storage: torch.Tensor, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    """The inverse of to_storage: a view (no copy) of the first bytes as `dtype` in `shape`."""
    return storage.reshape(-1).view(torch.uint8)[:_nbytes(dtype, shape)].view(dtype).view(shape)


def _packed_property(name: str):
    def get(self):
        dtype, shape = self._packed_layout[name]
        storage = self._parameters[name + SUFFIX]
        if type(storage).__name__ == "DTensor" or storage.numel() * storage.element_size() < _nbytes(dtype, shape):
            # a shard (outside forward): shape and dtype for whoever inspects them, no bytes to compute with
            return torch.empty(shape, dtype=dtype, device="meta")
        return from_storage(storage, dtype, shape)

    def set_(self, value):
        current = get(self)
        if value is current or (isinstance(value, torch.Tensor) and value.device == current.device
                                and (value.device.type == "meta"
                                     or value.untyped_storage().data_ptr() == current.untyped_storage().data_ptr())):
            return  # peft's GPTQ dispatch assigns a layer's qweight to itself (`target.qweight = base.qweight`)
        raise RuntimeError(
            f"{type(self).__name__}.{name}: this GPTQ layer's packed weights are sharded parameters "
            f"({name + SUFFIX}); gptqmodel tried to replace them, which only its inference repacking does. "
            "Train with qlaunch.model.gptq.pin_training_kernels applied before any no-grad forward.")

    return property(get, set_)


_SHARDABLE_CLASSES: dict[type, type] = {}


def shardable_class(cls: type) -> type:
    """`cls` with the packed tensors read from their storage parameters (one subclass per kernel class,
    so isinstance checks by peft and gptqmodel still hold)."""
    if cls not in _SHARDABLE_CLASSES:
        attrs = {name: _packed_property(name) for name in PACKED}
        # gptqmodel's eval path moves g_idx to the CPU by assignment (TorchLinear._maybe_offload_g_idx_to_cpu);
        # a sharded parameter cannot be moved by one layer, and the saving is a few KB per layer.
        attrs["_maybe_offload_g_idx_to_cpu"] = lambda self: None
        attrs["__module__"] = __name__
        _SHARDABLE_CLASSES[cls] = type(f"Shardable{cls.__name__}", (cls,), attrs)
    return _SHARDABLE_CLASSES[cls]


def make_shardable(model: nn.Module, dtype: torch.dtype) -> int:
    """Turn every GPTQ layer's packed buffers into frozen `dtype` parameters of the same bytes; returns
    how many layers changed. Call after LoRA is attached and before the engine wraps the model."""
    changed = 0
    for name, module in model.named_modules():
        if not is_gptq_layer(module) or SUFFIX in "".join(module._parameters):
            continue
        if getattr(module, "SUPPORTS_TRAINING_USE_TORCH_KERNEL", False):
            raise RuntimeError(f"{name}: {type(module).__name__} swaps its qzeros between formats on train/eval, "
                               "which a sharded parameter cannot follow; load it with the trainable backend.")
        layout = {}
        for key in PACKED:
            tensor = module._buffers.pop(key)
            layout[key] = (tensor.dtype, tensor.shape)
            module.register_parameter(key + SUFFIX, nn.Parameter(to_storage(tensor, dtype), requires_grad=False))
        module._packed_layout = layout
        module.__class__ = shardable_class(type(module))
        changed += 1
    return changed


def unalias_peft_layers(model: nn.Module) -> int:
    """peft's GPTQ LoRA layer registers the quantized layer twice, as `base_layer` and `quant_linear_module`.
    torch's state-dict helpers drop frozen parameters by their first name only, so under FSDP2 every
    checkpoint would carry the whole packed base under the second name (and a resume would fail on it).
    Keep the second name as a plain attribute: forward still calls the same module, hooks and all."""
    count = 0
    for module in model.modules():
        alias = module._modules.get("quant_linear_module")
        if alias is not None and alias is module._modules.get("base_layer"):
            del module._modules["quant_linear_module"]
            object.__setattr__(module, "quant_linear_module", alias)
            count += 1
    return count


def base_classes(model: nn.Module) -> None:
    """Put gptqmodel's own classes back (before pickling a skeleton: the subclasses are made at run time and
    cannot be found by name on another rank); `restore_classes` undoes it."""
    for module in model.modules():
        if type(module) in _SHARDABLE_CLASSES.values():
            module.__class__ = type(module).__bases__[0]


def restore_classes(model: nn.Module) -> int:
    """The shardable classes for every layer that carries packed storage parameters; returns how many."""
    restored = 0
    for module in model.modules():
        if hasattr(module, "_packed_layout") and type(module) not in _SHARDABLE_CLASSES.values():
            module.__class__ = shardable_class(type(module))
            restored += 1
    return restored


def packed_bytes(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Each GPTQ layer's packed tensors as its kernel reads them (a copy), by module name."""
    return {name: {key: getattr(module, key).detach().clone() for key in PACKED}
            for name, module in model.named_modules() if is_gptq_layer(module)}
