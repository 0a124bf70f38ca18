"""An MoE's fused experts in the plan: packed 4-bit bytes (qlaunch.model.experts_4bit), the 16-bit stack
held while each is quantized, and what the routed experts keep for backward."""
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


def routed_experts_bytes(shape: Shape, c: int, tokens: int) -> dict:
    """An MoE block's MLP (transformers' eager experts loop): each token goes through its top-k experts, and
    each of those k passes keeps its own copy of the token (the input gathered for that expert), the gated
    intermediates of the expert's width (4 tensors, as a dense gated MLP) and the expert's output (kept to be
    weighted by the router); the router keeps its fp32 probabilities; a shared expert (Qwen2-MoE) is a dense
    gated MLP of its own width. On tiny Qwen3-MoE / Qwen2-MoE / Mixtral: 1.6-2.3% below what autograd keeps."""
    h, k, experts = shape.hidden, shape.experts_per_token, shape.fused_experts[0][0]
    out = {"routed experts (top-k token copies, intermediates, outputs)":
           k * c * (2 * h + 4 * shape.expert_width) * tokens,
           "router probabilities": 4 * experts * tokens}
    shared = [lin.n_out for lin in shape.block if lin.name == "up_proj"]
    if shared:
        out["shared expert intermediates"] = (4 * c * shared[0] + c * h) * tokens
    return out
