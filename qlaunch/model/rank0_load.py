"""One rank reads the checkpoint; the others get the model's shape and, once FSDP2 has sharded it, their shards.

Under FSDP2 every rank would otherwise build the whole 4-bit base in its host memory (8 ranks of a
70B NF4 job: 8 x 41 GB on one node) and read the whole checkpoint. accelerate's own answer,
`cpu_ram_efficient_loading`, moves the model to the meta device and broadcasts rank 0's state dict
after `fully_shard` — but it skips models with bitsandbytes `Params4bit` (`.to("meta")` drops their
class and quantization state; accelerate/utils/fsdp_utils.py), so 4-bit bases never get it. This
module does the same for them, by hand because no library does:

1. rank 0 loads the base as usual (in host memory: qlaunch.model.load.device_map_for);
2. it broadcasts a skeleton: the same modules with every parameter on the meta device and the small
   quantization states (absmax, codebooks: ~1/64 of the 4-bit bytes) real, so the other ranks build
   nothing and read nothing; LoRA is then attached on every rank alike. A GPTQ base's packed weights
   are parameters by then (qlaunch.model.gptq_shard) and travel as meta tensors like the rest;
3. after accelerate's `fully_shard`, rank 0 broadcasts one tensor at a time and each rank keeps its
   shard (`scatter_from_rank0`), before the first forward and before a checkpoint is resumed. A GPTQ
   base has no Params4bit, so accelerate does this step itself when `cpu_ram_efficient_loading` is on
   (qlaunch.config.resolve.scatter_needed).
"""
from __future__ import annotations

import copy
import types

import torch
from torch import nn

from qlaunch.model import gptq_shard


def _linear4bit_modules(model: nn.Module):
    from bitsandbytes.nn import Linear4bit

    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def skeleton_of(model: nn.Module) -> nn.Module:
    """The model with its parameters on the meta device (shape, dtype and class kept) and everything else
    (quantization states, buffers, config) as it is: what the other ranks need to build the same modules."""
    from bitsandbytes.nn import Params4bit

    memo: dict[int, object] = {}
    for module in _linear4bit_modules(model):
        state = getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)
        module.quant_state = state  # bitsandbytes restores a gathered weight's state from its module
        if state is not None:
            memo[id(state)] = state  # shared, not copied: it is small and must stay one object
    for p in model.parameters():
        meta = torch.empty_like(p.data, device="meta")
        if isinstance(p, Params4bit):
            memo[id(p)] = Params4bit(meta, requires_grad=p.requires_grad, quant_state=p.quant_state,
                                     blocksize=p.blocksize, compress_statistics=p.compress_statistics,
                                     quant_type=p.quant_type, quant_storage=p.quant_storage, module=None,
                                     bnb_quantized=True)
        else:
            memo[id(p)] = nn.Parameter(meta, requires_grad=p.requires_grad)
    skeleton = copy.deepcopy(model, memo)
    gptq_shard.base_classes(skeleton)  # pickled by name: the run-time subclasses exist on rank 0 only
    for name, value in vars(skeleton).items():
        # optimum's GPTQ post-init sets model.quantize_config to an instance of a class local to a function,
        # which pickle cannot name: its attributes travel in a namespace instead
        if "<locals>" in type(value).__qualname__ and hasattr(value, "__dict__"):
            setattr(skeleton, name, types.SimpleNamespace(**vars(value)))
    return skeleton


def load_on_rank0(load):
    """`load()` on rank 0; the skeleton of its result on every other rank (collective)."""
    import torch.distributed as dist

    model = load() if dist.get_rank() == 0 else None
    box = [skeleton_of(model) if model is not None else None]
    dist.broadcast_object_list(box, src=0)
    if model is None:
        model = box[0]
        _restore_params4bit(model)
        gptq_shard.restore_classes(model)
    return model


def _restore_params4bit(model: nn.Module) -> None:
    """Pickling turns a Params4bit into a plain Parameter (torch rebuilds parameters by class Parameter); put
    the class back, as on rank 0: bitsandbytes' forward and accelerate's FSDP2 preparation both look for it
    (accelerate takes another path for models without it, and the ranks' collectives would diverge)."""
    from bitsandbytes.nn import Params4bit

    for module in _linear4bit_modules(model):
        weight, state = module.weight, module.quant_state
        if isinstance(weight, Params4bit) or state is None:
            continue
        module.weight = Params4bit(weight.data, requires_grad=weight.requires_grad, quant_state=state,
                                   blocksize=state.blocksize, compress_statistics=state.nested,
                                   quant_type=state.quant_type, quant_storage=weight.dtype, module=module,
                                   bnb_quantized=True)


def rank0_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Rank 0's full parameters and buffers by name, taken before fully_shard replaces them; the other ranks
    contribute nothing (their tensors are on the meta device)."""
    import torch.distributed as dist

    if dist.get_rank() != 0:
        return {}
    named = dict(model.named_parameters())
    named.update(model.named_buffers())
    return {name: t.detach() for name, t in named.items()}


def scatter_from_rank0(model: nn.Module, full: dict, *, device: torch.device, offload: bool) -> int:
    """Give every rank its shard of rank 0's tensors (collective; after fully_shard, before the first forward).

    Ranks that hold meta parameters get real, empty ones first (on the host with FSDP2's CPU offload); then
    one full tensor at a time goes out from rank 0 and each rank copies its own slice, so no rank ever holds
    more than its shards plus one tensor. Returns the number of tensors sent."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    if any(p.device.type == "meta" for p in model.parameters()):
        model.to_empty(device="cpu" if offload else device)
    sent = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if isinstance(param, DTensor):  # rank 0 scatters: each rank receives only its slice
                whole = _on_rank0(full.pop(name, None), param.shape, param.dtype, device)
                param.to_local().copy_(distribute_tensor(whole, param.device_mesh, param.placements,
                                                         src_data_rank=0).to_local())
            else:
                param.copy_(_broadcast(full.pop(name, None), param.shape, param.dtype, device))
            sent += 1
        for name, buffer in list(model.named_buffers()):
            whole = _broadcast(full.pop(name, None), buffer.shape, buffer.dtype, device)
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            persistent = attr not in owner._non_persistent_buffers_set
            owner.register_buffer(attr, whole.to(device), persistent=persistent)
            sent += 1
    for module in _linear4bit_modules(model):  # rank 0's moved with its weights; the others' arrived on the host
        if module.quant_state is not None:
            module.quant_state.to(device)
    full.clear()
    dist.barrier()
    return sent


def _on_rank0(tensor, shape, dtype, device) -> torch.Tensor:
    """Rank 0's full tensor on the communication device; an empty one of the same shape elsewhere."""
    import torch.distributed as dist

    if dist.get_rank() != 0:
        return torch.empty(shape, dtype=dtype, device=device)
    if tensor is None:
        raise RuntimeError("rank 0 has no full tensor for a parameter the other ranks expect")
    return tensor.to(device).contiguous()


def _broadcast(tensor, shape, dtype, device) -> torch.Tensor:
    import torch.distributed as dist

    tensor = _on_rank0(tensor, shape, dtype, device)
    dist.broadcast(tensor, src=0)
    return tensor
