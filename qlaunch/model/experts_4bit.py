"""4-bit fused experts: the 3-D expert parameters of an MoE base quantized per expert with bitsandbytes.

transformers 5 holds the experts of Qwen2-MoE, Qwen3-MoE, Mixtral and others as 3-D parameters
[experts, out, in], and bitsandbytes' quantizer converts nn.Linear only, so under NF4/FP4 the experts —
most of an MoE model — would stay in 16 bits. Here each expert's matrix is quantized with bitsandbytes'
own `quantize_4bit` (the run's type, blocksize 64, double quant as asked), and the whole stack stays one
frozen parameter at the same name: one row per expert holding its packed codes and its statistics, as
uint8 (or, for the engines that shard it, the same bytes viewed as the compute dtype, as bitsandbytes'
quant_storage does for Linear4bit).

The experts' eager forward (the one transformers ships in each modeling file) reads one expert at a time,
`self.gate_up_proj[expert_idx]`. The experts module reads that name as a PackedStack, whose indexing
dequantizes that expert only, so no 16-bit copy of the stack ever exists. It is the module that does so,
not the parameter: FSDP2 swaps in a plain unsharded parameter for each forward and ZeRO-3 gathers into
it, and both keep the module. The grouped/batched kernels read the whole 3-D tensor, so the model is set
to the eager implementation. Backward dequantizes each expert again rather than keeping the 16-bit matrix
`F.linear` saved (qlaunch.model.recompute_saved).

LoRA on these experts (--lora_target_parameters) uses peft's own ParamWrapper, so the adapter's tensors,
names and file are exactly peft's and load with plain peft on a 16-bit base. peft adds its update by
parametrizing the whole 16-bit stack (W + B·A for every expert); that cannot apply to packed codes, so
the wrapper here hands the low-rank factors to the experts module instead, whose stacks add expert e's
scaling·B_e·A_e to the one expert they dequantize.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import nn

from qlaunch.config.moe import is_fused_experts
from qlaunch.model.recompute_saved import RebuildInBackward

BLOCKSIZE = 64  # bitsandbytes' default for 4-bit weights, as its Linear4bit uses
NESTED_BLOCKSIZE = 256  # bitsandbytes' blocksize for double-quantized statistics
FP32 = 4


def _aligned(n: int) -> int:
    """Bytes rounded up to a float32 boundary, so statistics stored after the codes can be viewed as float32."""
    return -(-n // FP32) * FP32


@dataclass(frozen=True)
class ExpertLayout:
    """Where each part of one expert's quantized matrix sits in its uint8 row."""

    experts: int
    out_features: int  # of the stored matrix (its dim 1), whatever the forward's orientation
    in_features: int
    quant_type: str
    double_quant: bool
    dtype: torch.dtype  # what dequantizing returns: the compute dtype

    @property
    def values(self) -> int:
        return self.out_features * self.in_features

    @property
    def blocks(self) -> int:
        return -(-self.values // BLOCKSIZE)

    @property
    def nested_blocks(self) -> int:
        return -(-self.blocks // NESTED_BLOCKSIZE)

    @property
    def codes_bytes(self) -> int:
        return _aligned(-(-self.values // 2))

    @property
    def absmax_bytes(self) -> int:
        return _aligned(self.blocks) if self.double_quant else self.blocks * FP32

    @property
    def row_bytes(self) -> int:
        nested = (self.nested_blocks + 1) * FP32 if self.double_quant else 0  # nested absmax + offset
        return self.codes_bytes + self.absmax_bytes + nested

    def bits_per_value(self) -> float:
        return self.row_bytes * 8 / self.values


def packed_bytes(experts: int, out_features: int, in_features: int, double_quant: bool) -> int:
    """Bytes of one fused stack once packed (what the plan counts; the test measures the same)."""
    return experts * ExpertLayout(experts, out_features, in_features, "nf4", double_quant, torch.float16).row_bytes


@functools.lru_cache(maxsize=None)
def _codebooks(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4-bit code and the nested statistics' 8-bit code, built once per device: every expert of every
    forward dequantizes with them, and bitsandbytes builds the 8-bit one in Python."""
    from bitsandbytes.functional import create_dynamic_map, get_4bit_type

    return get_4bit_type(quant_type, device=device), create_dynamic_map(signed=True).to(device)


def quantize_expert(weight: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """One expert's [out, in] matrix as its uint8 row (codes, then absmax, then the nested statistics)."""
    from bitsandbytes.functional import quantize_4bit

    codes, state = quantize_4bit(weight.contiguous(), blocksize=BLOCKSIZE, compress_statistics=layout.double_quant,
                                 quant_type=layout.quant_type)
    row = torch.zeros(layout.row_bytes, dtype=torch.uint8, device=weight.device)
    row[:codes.numel()] = codes.reshape(-1)
    start = layout.codes_bytes
    if layout.double_quant:
        row[start:start + layout.blocks] = state.absmax.reshape(-1)
        start += layout.absmax_bytes
        nested = torch.cat([state.state2.absmax.reshape(-1).float(), state.offset.reshape(1).float()])
        row[start:start + nested.numel() * FP32] = nested.view(torch.uint8)
    else:
        row[start:start + layout.absmax_bytes] = state.absmax.reshape(-1).float().view(torch.uint8)
    return row


def dequantize_expert(row: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """An expert's matrix back from its row (uint8, or the same bytes in another dtype), in layout.dtype."""
    from bitsandbytes.functional import QuantState, dequantize_4bit

    row = row.view(torch.uint8)
    code, nested_code = _codebooks(layout.quant_type, row.device)
    start = layout.codes_bytes
    codes = row[:-(-layout.values // 2)].reshape(-1, 1)
    if layout.double_quant:
        absmax = row[start:start + layout.blocks]
        start += layout.absmax_bytes
        nested = row[start:start + (layout.nested_blocks + 1) * FP32].view(torch.float32)
        state2 = QuantState(absmax=nested[:-1], code=nested_code, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        state = QuantState(absmax=absmax, shape=torch.Size((layout.out_features, layout.in_features)), code=code,
                           blocksize=BLOCKSIZE, quant_type=layout.quant_type, dtype=layout.dtype,
                           offset=nested[-1], state2=state2)
    else:
        absmax = row[start:start + layout.absmax_bytes].view(torch.float32)
        state = QuantState(absmax=absmax, shape=torch.Size((layout.out_features, layout.in_features)), code=code,
                           blocksize=BLOCKSIZE, quant_type=layout.quant_type, dtype=layout.dtype)
    return dequantize_4bit(codes, state)


class PackedStack:
    """What a packed experts module's `gate_up_proj` (etc.) reads as: indexing gives one expert's matrix,
    dequantized, plus the active adapters' update for that expert. shape is the fused parameter's
    [experts, out, in], which peft sizes expert LoRA from; dtype and device are the storage's."""

    def __init__(self, storage: torch.Tensor, layout: ExpertLayout, lora_terms: tuple = (),
                 rebuild: RebuildInBackward | None = None):
        self.storage, self.layout, self.lora_terms, self.rebuild = storage, layout, lora_terms, rebuild

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.layout.experts, self.layout.out_features, self.layout.in_features))

    @property
    def ndim(self) -> int:
        return 3

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    @property
    def device(self) -> torch.device:
        return self.storage.device

    @property
    def requires_grad(self) -> bool:
        return False

    def __getitem__(self, index) -> torch.Tensor:
        e = int(index)
        weight = self.expert(e)
        if self.rebuild is not None:  # whatever saves it for backward keeps how to build it again instead
            self.rebuild.remember(weight, functools.partial(self.expert, e))
        return weight

    def expert(self, e: int) -> torch.Tensor:
        weight = dequantize_expert(self.storage[e], self.layout)
        for lhs, rhs, scaling in self.lora_terms:  # (lhs [E, out, r], rhs [E, r, in], scaling) per adapter
            weight = weight + scaling * (lhs[e] @ rhs[e]).to(weight.dtype)
        return weight


class PackedExperts:
    """Mixed into an experts module whose fused parameters are packed (`quantize_experts`): inside its forward
    (and while peft attaches LoRA: `packed_views`) those names read as PackedStack; everywhere else as the
    parameters they are, which the engines read and replace by name (FSDP2's getattr / _parameters).
    `packed_layouts` and `lora_terms` live in the instance, so copies and pickles (the skeleton other ranks
    receive) carry them; the class is rebuilt from the model's own experts class."""

    _unpacked_class: type = nn.Module

    def __getattr__(self, name):
        value = super().__getattr__(name)
        layout = self.__dict__.get("packed_layouts", {}).get(name)
        if layout is None or not self.__dict__.get("reading_packed"):
            return value
        return PackedStack(value, layout, self.__dict__["lora_terms"].get(name, ()), self.__dict__.get("rebuild"))

    def forward(self, *args, **kwargs):
        with packed_views(self), RebuildInBackward() as rebuild:
            self.__dict__["rebuild"] = rebuild
            try:
                return super().forward(*args, **kwargs)
            finally:
                self.__dict__.pop("rebuild", None)

    def __reduce_ex__(self, protocol):
        return _packed_instance, (self._unpacked_class,), self.__getstate__()


@contextlib.contextmanager
def packed_views(model: nn.Module):
    """The packed experts of `model` read as PackedStack while this lasts (their forward; peft sizing LoRA)."""
    modules = [m for m in model.modules() if isinstance(m, PackedExperts)]
    before = [m.__dict__.get("reading_packed", False) for m in modules]
    for module in modules:
        module.__dict__["reading_packed"] = True
    try:
        yield
    finally:
        for module, flag in zip(modules, before):
            module.__dict__["reading_packed"] = flag


@functools.cache
def packed_class(experts_class: type) -> type:
    return type(f"Packed{experts_class.__name__}", (PackedExperts, experts_class), {"_unpacked_class": experts_class})


def _packed_instance(experts_class: type):
    return object.__new__(packed_class(experts_class))


def fused_expert_parameters(model: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """Every fused experts parameter (module, name, parameter), by qlaunch.config.moe's one rule."""
    return [(module, name, p) for module in model.modules()
            for name, p in module.named_parameters(recurse=False) if is_fused_experts(p)]


def packed_parameters(model: nn.Module) -> list[tuple[nn.Module, str, ExpertLayout]]:
    return [(module, name, layout) for module in model.modules() if isinstance(module, PackedExperts)
            for name, layout in module.packed_layouts.items()]


def quantize_experts(model: nn.Module, quant_type: str, double_quant: bool, compute_dtype: torch.dtype,
                     device: torch.device | str = "cpu", store_on: torch.device | str | None = None) -> tuple[int, int]:
    """Pack every fused 3-D expert parameter to 4 bits on `device`, one parameter at a time (only one 16-bit
    stack is ever on the device), keep the packed rows on `store_on` (default: the same device), and set the
    eager experts forward. Returns (values, bytes) stored."""
    values = stored = 0
    for module, name, param in fused_expert_parameters(model):
        experts, out_features, in_features = param.shape
        layout = ExpertLayout(experts, out_features, in_features, quant_type, double_quant, compute_dtype)
        weights = param.data.to(device)
        rows = torch.stack([quantize_expert(weights[e], layout) for e in range(experts)]).to(store_on or device)
        del weights
        if not isinstance(module, PackedExperts):
            module.__class__ = packed_class(type(module))
            module.packed_layouts, module.lora_terms = {}, {}
        module.packed_layouts[name] = layout
        setattr(module, name, nn.Parameter(rows, requires_grad=False))
        values += param.numel()
        stored += rows.numel()
    if values and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")  # the only forward that indexes one expert at a time
    return values, stored


def store_packed_as(model: nn.Module, dtype: torch.dtype) -> int:
    """View the packed bytes as `dtype` (same bytes): ZeRO-3 casts parameters to its compute dtype and FSDP2
    shards floating parameters only, like bitsandbytes' quant_storage. After k-bit preparation, which would
    convert 16-bit values to fp32. Returns how many stacks."""
    stacks = packed_parameters(model)
    for module, name, _ in stacks:
        param = module._parameters[name]
        setattr(module, name, nn.Parameter(param.data.view(dtype), requires_grad=False))
    return len(stacks)


class ExpertsLoraWrapper:
    """Mixed into peft's ParamWrapper instances over packed experts (`adapt_packed_experts`): the same adapter
    tensors, applied per expert as it is dequantized instead of by parametrizing the whole 16-bit stack."""

    def _factors(self, adapter: str):
        # peft's ParamWrapper stores A as [r*E, in] and B as [out, r*E], in peft's in/out naming; per expert
        # the update is B_e @ A_e in the orientation the parameter is stored in (peft's get_delta_factors)
        experts = self.num_experts
        a = self.lora_A[adapter].weight.reshape(experts, -1, self.lora_A[adapter].weight.shape[-1])
        b = self.lora_B[adapter].weight.reshape(self.lora_B[adapter].weight.shape[0], -1, experts).permute(2, 0, 1)
        if self._did_swap_in_out_features:
            return b, a, self.scaling[adapter]
        return a.transpose(-2, -1), b.transpose(-2, -1), self.scaling[adapter]

    @contextlib.contextmanager
    def _activate_lora(self, active_adapters):
        experts = self.get_base_layer()
        experts.lora_terms[self.parameter_name] = tuple(self._factors(a) for a in active_adapters if a in self.lora_A)
        try:
            yield
        finally:
            experts.lora_terms.pop(self.parameter_name, None)


def adapt_packed_experts(model: nn.Module) -> int:
    """Make every peft ParamWrapper over packed experts apply its factors per expert; how many were adapted."""
    from peft.tuners.lora.layer import ParamWrapper

    adapted = 0
    for module in model.modules():
        if isinstance(module, ParamWrapper) and isinstance(module.get_param(), PackedStack):
            if not isinstance(module, ExpertsLoraWrapper):
                module.__class__ = _packed_wrapper_class(type(module))
            adapted += 1
    return adapted


@functools.cache
def _packed_wrapper_class(wrapper_class: type) -> type:
    # isinstance(module, ParamWrapper) stays true, so peft saves, counts and unloads the module as its own
    return type(f"Packed{wrapper_class.__name__}", (ExpertsLoraWrapper, wrapper_class), {})
