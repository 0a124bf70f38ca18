"""Precision rules, all in one place.

Every rule a user can break has exactly one message saying what to pass instead.
The decision depends on the base (full precision, bitsandbytes NF4/FP4, GPTQ Int4), the
--precision / --fp16 / --bf16 flags and the device facts (a `Machine`); it returns the compute
dtype and the flags the Trainer should see.

Default (`--precision auto`): bf16 on GPUs of compute capability >= 8.0 (Ampere+), fp16 below,
fp16 for GPTQ (its kernels compute in fp16); float32 on CPU. Explicit flags win.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qlaunch.config.machine import Machine

PRECISIONS = ("auto", "bf16", "fp16", "fp32")

CPU_NOTE = (
    "No CUDA device: training on CPU in float32. --fp16/--bf16 are GPU settings "
    "(torch ignores fp16 autocast on CPU, and bf16 on CPUs without bf16 units is several times slower)."
)
GPTQ_BF16_NOTE = (
    "GPTQ Int4 base in bf16: gptqmodel's trainable kernels dequantize with their fp16 scales and compute in bf16 "
    "(losses within 1e-3 of fp16 on CPU, tested); fp16, the default, keeps the scales' own dtype."
)
GPTQ_FP32 = "--precision fp32: GPTQ Int4 kernels compute in fp16; use --precision auto (or fp16)."
GPTQ_FP16_DEFAULT = "GPTQ Int4 base: mixed precision set to fp16 (GPTQ kernels compute in fp16)."
NF4_FP16_WARN = (
    "NF4/FP4 with fp16 compute can overflow in activations; on GPUs with bf16 (Ampere or newer) prefer --bf16 True."
)
NO_GPU_BF16 = "--bf16 True: this GPU has no bf16 support (compute capability < 8.0); pass --fp16 True instead."
BOTH = "--fp16 and --bf16 are both set: choose one."
CONFLICT = "--precision {precision} contradicts --{flag} True: pass one of them."
AUTO_BF16 = "Precision auto: bf16 mixed precision (GPU compute capability {cap} >= 8.0)."
AUTO_FP16 = ("Precision auto: fp16 mixed precision (GPU compute capability {cap} < 8.0 has no fast bf16); "
             "trainable parameters stay float32.")
TF32_NOTE = "TF32 matmuls enabled (Ampere+); pass --tf32 False to disable."


@dataclass
class Precision:
    compute_dtype: torch.dtype
    fp16: bool
    bf16: bool
    tf32: bool | None = None  # None: leave torch's default alone
    notes: list[str] = field(default_factory=list)  # info lines for the log
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def requested(precision: str, fp16: bool, bf16: bool) -> tuple[str, list[str]]:
    """The one precision asked for: explicit --fp16/--bf16 flags, else --precision."""
    if fp16 and bf16:
        return "auto", [BOTH]
    flag = "fp16" if fp16 else "bf16" if bf16 else None
    if flag is None:
        return precision, []
    if precision not in ("auto", flag):
        return flag, [CONFLICT.format(precision=precision, flag=flag)]
    return flag, []


def resolve_precision(
    quant_method: str | None,
    fp16: bool,
    bf16: bool,
    *,
    machine: Machine,
    precision: str = "auto",
    tf32: bool | None = None,
) -> Precision:
    """Decide compute dtype and Trainer AMP flags for `machine`.

    quant_method: None (full-precision base), "nf4", "fp4" or "gptq".
    precision: --precision (auto | bf16 | fp16 | fp32); --fp16/--bf16 True mean the same as bf16/fp16.
    tf32: --tf32 as given (None: on where the GPU has it).
    """
    want, problems = requested(precision, fp16, bf16)
    if problems:
        return Precision(torch.float32, fp16, bf16, problems=problems)

    if not machine.cuda:
        asked = want != "auto" or quant_method
        return Precision(torch.float32, False, False,
                         notes=[CPU_NOTE if asked else "No CUDA device: training on CPU in float32."])

    cap = ".".join(map(str, machine.capability or ()))
    tf32 = machine.tf32 if tf32 is None else tf32
    notes = [TF32_NOTE] if tf32 and machine.tf32 else []
    tf32 = tf32 if machine.tf32 else None  # transformers raises on --tf32 True without Ampere

    if want == "bf16" and not machine.bf16:
        return Precision(torch.float32, fp16, bf16, problems=[NO_GPU_BF16])

    if quant_method == "gptq":
        if want == "bf16":  # the GPU has bf16 (checked above); gptqmodel's Torch/Triton kernels accept it
            return Precision(torch.bfloat16, False, True, tf32, notes=notes + [GPTQ_BF16_NOTE])
        if want == "fp32":
            return Precision(torch.float16, fp16, bf16, problems=[GPTQ_FP32])
        notes += [] if want == "fp16" else [GPTQ_FP16_DEFAULT]
        return Precision(torch.float16, True, False, tf32, notes=notes)

    if want == "auto":
        want = "bf16" if machine.bf16 else "fp16"
        notes.append((AUTO_BF16 if want == "bf16" else AUTO_FP16).format(cap=cap))
    warnings = [NF4_FP16_WARN] if want == "fp16" and quant_method in ("nf4", "fp4") and machine.bf16 else []
    if want == "fp32":
        return Precision(torch.float32, False, False, tf32, notes=notes)
    if want == "bf16":
        return Precision(torch.bfloat16, False, True, tf32, notes=notes)
    return Precision(torch.float16, True, False, tf32, notes=notes, warnings=warnings)
