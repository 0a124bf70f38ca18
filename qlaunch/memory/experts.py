"""An MoE's fused experts in the plan: packed 4-bit bytes (qlaunch.model.experts_4bit) and the 16-bit stack
held while each is quantized."""
from __future__ import annotations

from qlaunch.memory.shape import Shape


def packed_experts_bytes(shape: Shape, double_quant: bool) -> int:
    return sum(packed_bytes_of(stack, double_quant) for stack in shape.fused_experts)


def packed_bytes_of(stack: tuple[int, int, int], double_quant: bool) -> int:
    from qlaunch.model.experts_4bit import packed_bytes

    return packed_bytes(*stack, double_quant)


def largest_16bit_load_unit(shape: Shape, job) -> int:
    """Weights of the largest tensor held in 16 bits while it is quantized: a block projection, or under
    NF4/FP4 a whole fused expert stack (qlaunch.model.experts_4bit quantizes one stack at a time)."""
    stacks = [e * o * i for e, o, i in shape.fused_experts] if job.quant in ("nf4", "fp4") else []
    return max([lin.n_in * lin.n_out for lin in shape.block] + stacks)
