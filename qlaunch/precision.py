"""Precision rules, all in one place.

Every rule a user can break has exactly one message saying what to pass instead.
The decision depends on the base (full precision, bitsandbytes NF4/FP4, GPTQ Int4), the
--fp16/--bf16 flags and the hardware; it returns the compute dtype and the flags the
Trainer should see.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

CPU_NOTE = (
    "No CUDA device: training on CPU in float32. --fp16/--bf16 are GPU settings "
    "(torch ignores fp16 autocast on CPU, and bf16 on CPUs without bf16 units is several times slower)."
)
GPTQ_BF16 = (
    "GPTQ Int4 bases compute in fp16 (their kernels and scales are fp16): pass --fp16 True instead of --bf16 True."
)
GPTQ_FP16_DEFAULT = "GPTQ Int4 base: mixed precision set to fp16 (GPTQ kernels compute in fp16)."
NF4_FP16_WARN = (
    "NF4/FP4 with fp16 compute can overflow in activations; on GPUs with bf16 (Ampere or newer) prefer --bf16 True."
)
NO_GPU_BF16 = "--bf16 True: this GPU has no bf16 support; pass --fp16 True instead."
BOTH = "--fp16 and --bf16 are both set: choose one."


@dataclass
class Precision:
    compute_dtype: torch.dtype
    fp16: bool
    bf16: bool
    notes: list[str] = field(default_factory=list)  # info lines for the log
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def resolve_precision(
    quant_method: str | None,
    fp16: bool,
    bf16: bool,
    *,
    cuda: bool | None = None,
    cuda_bf16: bool | None = None,
) -> Precision:
    """Decide compute dtype and Trainer AMP flags.

    quant_method: None (full-precision base), "nf4", "fp4" or "gptq".
    cuda / cuda_bf16 default to what this machine has; tests pass them explicitly.
    """
    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda_bf16 is None:
        cuda_bf16 = bool(cuda and torch.cuda.is_bf16_supported())

    if fp16 and bf16:
        return Precision(torch.float32, fp16, bf16, problems=[BOTH])

    if not cuda:
        notes = [CPU_NOTE] if (fp16 or bf16 or quant_method) else ["No CUDA device: training on CPU in float32."]
        return Precision(torch.float32, False, False, notes=notes)

    if bf16 and not cuda_bf16:
        return Precision(torch.float32, fp16, bf16, problems=[NO_GPU_BF16])

    if quant_method == "gptq":
        if bf16:
            return Precision(torch.float16, fp16, bf16, problems=[GPTQ_BF16])
        notes = [] if fp16 else [GPTQ_FP16_DEFAULT]
        return Precision(torch.float16, True, False, notes=notes)

    if quant_method in ("nf4", "fp4"):
        if fp16:
            return Precision(torch.float16, True, False, warnings=[NF4_FP16_WARN])
        if bf16:
            return Precision(torch.bfloat16, False, True)
        return Precision(
            torch.float32,
            False,
            False,
            notes=["NF4/FP4 compute dtype float32 (no --bf16/--fp16 given); --bf16 True is faster on Ampere+."],
        )

    dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    return Precision(dtype, fp16, bf16)
