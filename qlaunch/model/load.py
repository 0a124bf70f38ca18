"""Load the tokenizer and the base model (full precision | bitsandbytes NF4/FP4 | GPTQ Int4).

Which quantization applies is read from flags and from the checkpoint's own config,
never from substrings of the model path (qlaunch.config.checkpoint). LoRA is attached by
qlaunch.model.lora.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from qlaunch.config.engine import Engine
from qlaunch.data.templates import ensure_chat_template, ensure_pad_token

log = logging.getLogger("qlaunch")

def load_tokenizer(model_name_or_path: str, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    template = ensure_chat_template(tokenizer)
    if template == "chatml":
        log.info("Tokenizer has no chat template: using ChatML (<|im_start|>role ... <|im_end|>).")
    elif template == "llama2":
        log.info("Tokenizer has no chat template and no ChatML tokens: using Llama-2's chat format "
                 "([INST] ... [/INST] answer %s); the answer and EOS are trained, so generation stops at EOS.",
                 tokenizer.eos_token)
    ensure_pad_token(tokenizer)
    return tokenizer


def quantization_config(quant_method: str | None, compute_dtype: torch.dtype, lora_args, gptq_backend=None):
    if quant_method in ("nf4", "fp4"):
        from transformers import BitsAndBytesConfig

        kwargs = {}
        if lora_args.bnb_4bit_quant_storage:
            kwargs["bnb_4bit_quant_storage"] = getattr(torch, lora_args.bnb_4bit_quant_storage)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_method,
            bnb_4bit_use_double_quant=lora_args.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            **kwargs,
        )
    if quant_method == "gptq":
        from qlaunch.model.gptq import gptq_training_config

        return gptq_training_config(gptq_backend)
    return None


def device_map_for(quant_method: str | None, *, cuda: bool, engine: Engine, local_rank: int = 0,
                   experts_4bit: bool = False):
    """Where from_pretrained puts the base, from the device facts (a pure function: tested with GPU facts).

    Quantized weights are placed at load time. Under DDP / ZeRO-2 each rank holds a whole copy, on
    its own GPU. Under FSDP2 a 4-bit base is built in host memory instead: fully_shard then moves one
    module at a time to the GPU and keeps only this rank's shard there (Params4bit.to carries the
    quantization state along), so no GPU ever holds the whole quantized model. ZeRO-3 builds it in host
    memory too, and qlaunch.model.zero3_init partitions it one parameter at a time onto the GPUs. A GPTQ
    base is built in host memory like NF4: its packed weights are shardable parameters once loaded.
    Full-precision bases load without a device map (under ZeRO-3 transformers partitions them itself).
    An MoE base whose fused experts qlaunch quantizes (experts_4bit) loads in host memory too, since
    bitsandbytes leaves those in 16 bits: each stack then goes to the GPU as it is quantized
    (qlaunch.model.experts_4bit), and the rest of the model after it."""
    if quant_method is None:
        return None
    if not cuda or engine.shards_parameters or experts_4bit:
        return {"": "cpu"}
    return {"": local_rank}


def training_device(cuda: bool, local_rank: int = 0) -> torch.device:
    return torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")


@dataclass(frozen=True)
class ExpertsPlacement:
    """Where an MoE base built in host memory has its fused experts packed, and where the model then lives."""
    quantize_on: torch.device  # each 16-bit stack comes here, one at a time, to be packed
    keep_on: torch.device  # where the packed rows stay
    move_model: bool  # the rest of the host-built model follows them onto the GPU


def experts_placement(cuda: bool, engine: Engine, local_rank: int = 0) -> ExpertsPlacement:
    """From the device facts (a pure function: tested with GPU facts). Packing runs on the training GPU
    either way; the sharding engines take the whole model from host memory (rank 0's sharded load,
    zero.Init), so there the packed rows go back beside it, while the replicating ones train where they
    packed, with the rest of the model moved there too."""
    device = training_device(cuda, local_rank)
    if engine.shards_parameters:
        return ExpertsPlacement(device, torch.device("cpu"), move_model=False)
    return ExpertsPlacement(device, device, move_model=device.type != "cpu")


def quantize_fused_experts(model, quant_method: str, double_quant: bool, compute_dtype: torch.dtype,
                           placement: ExpertsPlacement) -> None:
    """The fused experts quantized to 4 bits where `placement` says, the model moved after them if it says so."""
    from qlaunch.config.moe import amount
    from qlaunch.model.experts_4bit import quantize_experts

    values, stored = quantize_experts(model, quant_method, double_quant, compute_dtype, placement.quantize_on,
                                      store_on=placement.keep_on)
    if placement.move_model:
        torch.nn.Module.to(model, placement.keep_on)  # bitsandbytes' Params4bit.to carries its quantization state
        model.hf_device_map = {"": str(placement.keep_on)}
    log.info("MoE experts: %s parameters quantized to %s by qlaunch, %s stored (%.3f bits per parameter); "
             "eager experts forward.", amount(values), quant_method, amount(stored, "B"), stored * 8 / max(values, 1))


@contextlib.contextmanager
def zero3_flag_hidden(hide: bool):
    """transformers refuses any device_map while ZeRO-3 is on, so a quantized base could only go where the
    quantizer puts it without one: the whole model on the current GPU. For a quantized base ZeRO-3 changes
    nothing else in from_pretrained (it never builds one under deepspeed.zero.Init), so while it loads into
    host memory (device_map_for) the flag is hidden and then restored."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)  # set by TrainingArguments(deepspeed=...)
    config = ref() if ref is not None else None
    if not hide or config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def load_base_model(
    model_args, lora_args, quant_method: str | None, compute_dtype: torch.dtype, *, use_cpu: bool,
    engine: Engine = Engine(), load_dtype: torch.dtype | None = None, experts_4bit: bool = False,
) -> PreTrainedModel:
    from qlaunch.model.gptq import trainable_backend

    cuda = not use_cpu and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device_map = device_map_for(quant_method, cuda=cuda, engine=engine, local_rank=local_rank,
                                experts_4bit=experts_4bit)
    backend = trainable_backend(cuda=cuda, built_on_host=device_map in (None, {"": "cpu"}))
    kwargs = {
        "trust_remote_code": model_args.trust_remote_code,
        "dtype": load_dtype or compute_dtype,
        "quantization_config": quantization_config(quant_method, compute_dtype, lora_args, backend),
        "device_map": device_map,
    }
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    with zero3_flag_hidden(quant_method is not None and engine.zero_stage == 3):
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, **{k: v for k, v in kwargs.items() if v is not None}
        )
    model.config.use_cache = False  # the KV cache is useless in training and breaks checkpointing
    if experts_4bit:
        quantize_fused_experts(model, quant_method, lora_args.bnb_4bit_use_double_quant, compute_dtype,
                               experts_placement(cuda, engine, local_rank))
    if quant_method == "gptq":
        from qlaunch.model.gptq import kernel_summary, pin_training_kernels

        pinned = pin_training_kernels(model)
        log.info("GPTQ base: kernels %s%s.", kernel_summary(model),
                 f" ({pinned} pinned to their differentiable train mode)" if pinned else "")
    if engine.zero_stage == 3:
        from qlaunch.model.moe_blocks import zero3_leaf_moe_blocks

        zero3_leaf_moe_blocks(model)
    return model


