"""LoftQ initialisation (--init_lora_weights loftq) for NF4/FP4 Q-LoRA.

Plain LoRA starts with B = 0: the model starts as the 4-bit base, quantization error included. LoftQ
starts each adapter at the best rank-r approximation of that error, W − dequant(Q(W)) by SVD, so the
model starts closer to the full-precision base. This is the variant peft ships as
replace_lora_weights_loftq (one LoftQ iteration, the base kept exactly as bitsandbytes quantized it, so
the adapter loads on the same 4-bit base and merges like any other); written here because peft's runs
the SVD on "cuda" only and sets B·A to the approximation itself, which the adapter's scaling (alpha/r)
then multiplies: exact only when alpha == r. Here scaling·B·A is the rank-r approximation.
The full-precision weights are read one tensor at a time from the base's safetensors files.
"""
from __future__ import annotations

import logging

import torch

from qlaunch.config.errors import UsageError

log = logging.getLogger("qlaunch")


def svd_device(cuda_available: bool) -> str:
    """Where the SVDs run: the GPU when there is one (seconds per layer there, minutes on a CPU for 70B)."""
    return "cuda" if cuda_available else "cpu"


def low_rank_factors(residual: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [rank, in], B [out, rank]) with scaling · B @ A the best rank-`rank` approximation of residual [out, in]:
    the singular values split evenly between the factors, as LoftQ does."""
    u, s, vh = torch.linalg.svd(residual.float(), full_matrices=False)
    root = (s[:rank] / scaling).sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root


def loftq_initialise(peft_model, model_dir: str, adapter_name: str = "default", device: str | None = None) -> int:
    """Set every 4-bit layer's LoRA A and B from its quantization error (LoftQ); returns how many layers."""
    import bitsandbytes as bnb

    from qlaunch.model.shards import CheckpointReader

    device = device or svd_device(torch.cuda.is_available())
    try:
        reader = CheckpointReader(model_dir)
    except ValueError as e:
        raise UsageError(f"--init_lora_weights loftq reads the base's full-precision weights: {e}.") from None
    prefix = "base_model.model."
    ranks = []
    for name, module in peft_model.named_modules():
        base = getattr(module, "base_layer", None)
        if not isinstance(base, bnb.nn.Linear4bit) or adapter_name not in getattr(module, "lora_A", {}):
            continue
        key = name[len(prefix):] + ".weight" if name.startswith(prefix) else name + ".weight"
        if key not in reader.location or not reader.dtype(key).is_floating_point:
            raise UsageError(f"--init_lora_weights loftq: {model_dir!r} has no full-precision {key} (a checkpoint "
                             "saved already quantized?); LoftQ needs the 16/32-bit base.")
        weight = base.weight
        dequantized = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(device, torch.float32)
        residual = reader.read(key).to(device, torch.float32) - dequantized
        lora_a, lora_b = module.lora_A[adapter_name], module.lora_B[adapter_name]
        ranks.append(module.r[adapter_name])
        a, b = low_rank_factors(residual, ranks[-1], module.scaling[adapter_name])
        lora_a.weight.data = a.to(lora_a.weight.device, lora_a.weight.dtype)
        lora_b.weight.data = b.to(lora_b.weight.device, lora_b.weight.dtype)
    log.info("LoftQ: %d adapters initialised from their layers' 4-bit quantization error (rank %s SVD on %s).",
             len(ranks), "/".join(map(str, sorted(set(ranks)))) or "-", device)
    return len(ranks)
