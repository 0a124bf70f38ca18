"""GPTQ Int4 bases through GPT-QModel (gptqmodel), the maintained successor of auto-gptq.

auto-gptq does not import with transformers 5 / peft 0.21 and cannot quantize without CUDA;
transformers, optimum and peft load GPTQ checkpoints through gptqmodel now. Qwen's old
`disable_exllama` / `use_exllama` switches no longer exist (transformers swallows them
silently): the kernel is chosen with `backend=`.
"""
from __future__ import annotations

# gptqmodel picks a kernel that supports backward ("trainable"): on CUDA a Triton/Torch kernel
# (the ExLlama/Marlin inference kernels have no backward), on CPU the Torch kernels.
TRAINABLE_BACKEND = "auto_trainable"


def gptqmodel_pool_env(env, cpu_count: int) -> dict[str, str]:
    """The environment gptqmodel needs to start on this machine (a pure decision on the machine facts).

    gptqmodel sizes its CPU worker pool to half the cores, and always asks that pool for 2 model-loader
    workers: below 4 cores it refuses to start ("Virtual pool 'model_loader:cpu' requests 2 workers but
    parent 'cpu' only has 1"). Give it 2 workers there, unless the user set GPTQMODEL_CPU_WORKERS."""
    if "GPTQMODEL_CPU_WORKERS" in env or (cpu_count + 1) // 2 >= 2:
        return {}
    return {"GPTQMODEL_CPU_WORKERS": "2"}


def prepare_gptqmodel() -> None:
    """Before gptqmodel builds its pool (first use): this machine's pool environment."""
    import os

    os.environ.update(gptqmodel_pool_env(os.environ, os.cpu_count() or 1))


def trainable_backend(*, cuda: bool, built_on_host: bool) -> str:
    """The gptqmodel backend for training, from the device facts (pure: tested with GPU facts).

    gptqmodel picks a kernel for the device a layer is built on. A base built in host memory that will
    train on a GPU (FSDP2 moves it shard by shard, ZeRO-3 partitions it) would get the CPU-only
    TorchAtenLinear; ask for the Torch kernel there, which runs on every device and has a backward."""
    return "torch" if cuda and built_on_host else TRAINABLE_BACKEND


def gptq_training_config(backend: str | None = None):
    """Loading attributes for a GPTQ checkpoint that LoRA will train on.

    For a checkpoint that already carries a quantization_config, transformers keeps its
    bits / group_size / desc_act and takes only the loading attributes (backend) from here.
    """
    from transformers import GPTQConfig

    prepare_gptqmodel()
    return GPTQConfig(bits=4, backend=backend or TRAINABLE_BACKEND)


def pin_training_kernels(model) -> int:
    """Keep gptqmodel's CPU kernels on their differentiable dequantize + matmul path.

    gptqmodel's Torch kernels (TorchAtenLinear / TorchFusedLinear) fix their mode on the
    first forward: a first forward under no_grad in eval mode repacks the weights one-way
    for inference, after which LoRA gradients through them are wrong. Call this right after
    loading, before any forward. Returns how many layers were pinned.
    """
    pinned = 0
    for name, module in model.named_modules():
        if not (hasattr(module, "qweight") and hasattr(module, "linear_mode")):
            continue
        mode = getattr(module.linear_mode, "value", module.linear_mode)
        if mode == "inference":
            raise RuntimeError(
                f"{name}: this GPTQ layer was already repacked for no-grad inference by an earlier eval "
                "forward; reload the model and train before running any no-grad forward."
            )
        module.linear_mode = "train"
        pinned += 1
    return pinned


def kernel_summary(model) -> str:
    """Which gptqmodel kernel each quantized layer runs, by class ("28 TorchFusedLinear"; on CUDA e.g.
    "28 TritonV2Linear"): the kernel depends on the device and on what gptqmodel finds installed, and
    only the CPU Torch kernels have a mode to pin (pin_training_kernels returns 0 elsewhere)."""
    from collections import Counter

    kernels = Counter(type(m).__name__ for m in model.modules() if hasattr(m, "qweight"))
    return ", ".join(f"{count} {name}" for name, count in sorted(kernels.items())) or "no quantized layers"
