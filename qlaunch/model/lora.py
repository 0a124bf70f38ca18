"""Attach LoRA to a loaded base: which projections to adapt, k-bit preparation, and parameter counts."""
from __future__ import annotations

import logging
import math
import re

import torch
from transformers import PreTrainedModel

from qlaunch.config.checkpoint import GPTQ_EMBEDDINGS
from qlaunch.config.errors import UsageError

log = logging.getLogger("qlaunch")


def is_linear_like(module: torch.nn.Module) -> bool:
    # bnb Linear4bit subclasses nn.Linear; GPTQ quant-linear layers hold a packed `qweight`.
    return isinstance(module, torch.nn.Linear) or hasattr(module, "qweight")


def detect_lora_targets(model: torch.nn.Module) -> list[str]:
    """Names of every linear projection inside the repeated decoder blocks (never lm_head)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        if module is output or not is_linear_like(module):
            continue
        if re.search(r"\.\d+\.", name):  # inside a ModuleList of blocks, e.g. model.layers.3.mlp.up_proj
            names.add(name.rsplit(".", 1)[-1])
    if not names:
        raise UsageError(
            "found no linear projections inside decoder blocks to adapt; pass --lora_target_modules explicitly."
        )
    return sorted(names)


def attach_lora(model: PreTrainedModel, lora_args, *, quant_method: str | None, gradient_checkpointing: bool):
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if quant_method == "gptq" and lora_args.lora_modules_to_save:
        raise UsageError(GPTQ_EMBEDDINGS.format(modules=" ".join(lora_args.lora_modules_to_save)))

    if quant_method is not None:
        # Freezes the base, upcasts norms, and enables input grads + checkpointing (non-reentrant).
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        # With a frozen base, checkpointed blocks need an input that requires grad.
        model.enable_input_require_grads()

    if lora_args.lora_weight_path:
        log.info("Continuing training of the adapter in %s", lora_args.lora_weight_path)
        return peft_over_packed_experts(
            model, lambda: PeftModel.from_pretrained(model, lora_args.lora_weight_path, is_trainable=True),
            getattr(lora_args, "bnb_4bit_quant_storage", None))

    loftq = str(getattr(lora_args, "init_lora_weights", "true")).lower() == "loftq"
    targets = lora_args.lora_target_modules or detect_lora_targets(model)
    log.info("LoRA target modules: %s", ", ".join(targets))
    config = LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=targets,
        target_parameters=getattr(lora_args, "lora_target_parameters", None) or None,
        bias=lora_args.lora_bias,
        modules_to_save=lora_args.lora_modules_to_save,
        use_dora=bool(getattr(lora_args, "use_dora", False)),
        use_rslora=bool(getattr(lora_args, "use_rslora", False)),
        init_lora_weights=True if loftq else peft_init(getattr(lora_args, "init_lora_weights", "true")),
        task_type="CAUSAL_LM",
    )
    model = peft_over_packed_experts(model, lambda: get_peft_model(model, config),
                                     getattr(lora_args, "bnb_4bit_quant_storage", None))
    if loftq:  # peft's "loftq" wants a full-precision base (and a GPU): qlaunch.model.loftq on the 4-bit one
        from qlaunch.model.loftq import loftq_initialise

        loftq_initialise(model, model.get_base_model().name_or_path)
    return model


def peft_init(value) -> bool | str:
    """--init_lora_weights as peft takes it: true / false as booleans, a method by its name."""
    text = str(value).lower()
    return {"true": True, "false": False}.get(text, text)


def upcast_trainables(model: torch.nn.Module) -> int:
    """16-bit trainable parameters → float32, so mixed precision updates float32 weights (and keeps float32
    optimizer state): fp16 ones cannot be unscaled, bf16 ones lose small updates. Returns how many."""
    count = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
            count += 1
    return count


def numel(param: torch.Tensor) -> int:
    """The weights a parameter stands for, as transformers' num_parameters counts them: under ZeRO-3 a
    partitioned parameter is an empty placeholder (ds_numel is its size); a bitsandbytes 4-bit parameter
    packs two weights per byte of its storage (uint8: numel x 2, bf16: numel x 4) — its quantization
    state keeps the original shape."""
    n = getattr(param, "ds_numel", None) or param.numel()
    if type(param).__name__ != "Params4bit" or not getattr(param, "bnb_quantized", False):
        return n
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return math.prod(shape) if shape else n * 2 * param.element_size()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) weights. GPTQ's packed tensors are not counted whether they are buffers or, when an
    engine shards them, parameters (qlaunch.model.gptq_shard): the count is the same under every engine."""
    from qlaunch.model.gptq_shard import SUFFIX

    params = [p for name, p in model.named_parameters() if not name.endswith(SUFFIX)]
    return sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params)


def peft_over_packed_experts(base, make_peft_model, storage: str | None = None):
    """make_peft_model() with the base's 4-bit fused experts (qlaunch.model.experts_4bit) read as stacks of
    [experts, out, in], which peft sizes expert LoRA from, and its wrappers over them applying LoRA per expert.
    The packed bytes are then stored as `storage` (--bnb_4bit_quant_storage, set for ZeRO-3/FSDP2 to shard
    them): after peft (which casts adapters to a floating parameter's dtype) and after k-bit preparation
    (which converts 16-bit parameters to fp32)."""
    from qlaunch.model.experts_4bit import adapt_packed_experts, packed_views, store_packed_as

    with packed_views(base):
        model = make_peft_model()
        adapted = adapt_packed_experts(model)
    if adapted:
        log.info("LoRA on the 4-bit experts: added to each expert as it is dequantized (peft's adapter format).")
    if storage and store_packed_as(model, getattr(torch, storage)):
        log.info("4-bit experts stored as %s (the same bytes) so the engine can shard them.", storage)
    return model
