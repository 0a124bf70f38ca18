"""validate_args: every problem with the arguments, collected and reported at once.

Also resolves what depends on the machine (CPU fallback, precision) before the Hugging Face
TrainingArguments object is built, because its constructor rejects e.g. --bf16 on a CPU.
"""
from __future__ import annotations

import argparse
import json
import logging
import os

import torch

from qlaunch.errors import UsageError
from qlaunch.model import checkpoint_quant_method, require_library, resolve_quant_method
from qlaunch.precision import resolve_precision

log = logging.getLogger("qlaunch")

CHOICES = {
    "truncation": ("truncate", "drop"),
    "quantization": ("auto", "nf4", "fp4", "gptq"),
    "lora_bias": ("none", "all", "lora_only"),
}


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _check_paths(ns: argparse.Namespace, problems: list[str]) -> None:
    if not ns.model_name_or_path:
        problems.append("--model_name_or_path is required: a local model directory or a hub id.")
    elif ns.model_name_or_path.startswith((".", "/", "~")) and not os.path.isdir(
        os.path.expanduser(ns.model_name_or_path)
    ):
        problems.append(f"--model_name_or_path: directory not found: {ns.model_name_or_path!r}.")
    if not ns.data_path:
        problems.append("--data_path is required: a .json or .jsonl file of training samples.")
    for flag in ("data_path", "eval_data_path"):
        path = getattr(ns, flag)
        if path and not os.path.isfile(path):
            problems.append(f"--{flag}: file not found: {path!r}. Pass a .json or .jsonl file.")
        elif path and not path.endswith((".json", ".jsonl")):
            problems.append(f"--{flag}: {path!r} must end in .json (a list of records) or .jsonl (one per line).")
    if ns.lora_weight_path and not os.path.isfile(os.path.join(ns.lora_weight_path, "adapter_config.json")):
        problems.append(
            f"--lora_weight_path: no adapter_config.json in {ns.lora_weight_path!r}; "
            "pass a directory written by a LoRA run (its --output_dir)."
        )
    if ns.deepspeed and isinstance(ns.deepspeed, str) and not ns.deepspeed.lstrip().startswith("{"):
        if not os.path.isfile(ns.deepspeed):
            problems.append(f"--deepspeed: config file not found: {ns.deepspeed!r} (see ds_configs/).")
    if ns.config and not os.path.isfile(ns.config):
        problems.append(f"--config: file not found: {ns.config!r}.")


def _check_values(ns: argparse.Namespace, problems: list[str]) -> None:
    for name, allowed in CHOICES.items():
        if getattr(ns, name) not in allowed:
            problems.append(f"--{name} {getattr(ns, name)!r}: choose one of {', '.join(allowed)}.")
    if ns.lora_r < 1:
        problems.append(f"--lora_r {ns.lora_r}: the LoRA rank must be at least 1.")
    if ns.lora_alpha <= 0:
        problems.append(f"--lora_alpha {ns.lora_alpha}: must be positive.")
    if not 0 <= ns.lora_dropout < 1:
        problems.append(f"--lora_dropout {ns.lora_dropout}: must be in [0, 1).")
    if ns.model_max_length < 8:
        problems.append(f"--model_max_length {ns.model_max_length}: must be at least 8 tokens.")
    if ns.warmup_ratio is not None:
        if not 0 <= ns.warmup_ratio < 1:
            problems.append(f"--warmup_ratio {ns.warmup_ratio}: must be in [0, 1); use --warmup_steps N for steps.")
        else:
            ns.warmup_steps = ns.warmup_ratio
    if ns.lazy_preprocess and ns.truncation == "drop":
        problems.append(
            "--truncation drop needs every sample tokenized up front: remove --lazy_preprocess "
            "(or use --truncation truncate)."
        )
    if not ns.use_lora:
        for flag in ("lora_weight_path", "lora_modules_to_save", "lora_target_modules"):
            if getattr(ns, flag):
                problems.append(f"--{flag} has no effect without --use_lora (or --q_lora).")
    if ns.quantization != "auto" and not ns.q_lora:
        problems.append(f"--quantization {ns.quantization} has no effect without --q_lora.")


def read_deepspeed_config(ds) -> dict:
    if isinstance(ds, str):
        try:
            if ds.lstrip().startswith("{"):
                return json.loads(ds)
            with open(ds) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}
    return ds if isinstance(ds, dict) else {}


def zero_stage(ds: dict) -> int:
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    return int(stage) if str(stage).isdigit() else 0


GPTQ_ZERO3 = (
    "--deepspeed with ZeRO-3 cannot shard a GPTQ Int4 base: its packed int32 weights are buffers that "
    "ZeRO-3 does not partition, and gptqmodel kernels need them whole. Use ds_configs/zero2.json "
    "(a 4-bit 7B base fits one GPU; ZeRO-2 shards the optimizer state and gradients)."
)


def deepspeed_config_warnings(ds: dict) -> list[str]:
    """A DeepSpeed JSON's scheduler/optimizer blocks silently replace the user's flags: say so."""
    warnings = []
    if "scheduler" in ds:
        kind = ds["scheduler"].get("type", "?") if isinstance(ds["scheduler"], dict) else "?"
        warnings.append(
            f"the DeepSpeed config has a scheduler block ({kind}): it overrides --lr_scheduler_type and "
            "--warmup_steps. Remove the block (as in ds_configs/) to use your flags."
        )
    if "optimizer" in ds:
        kind = ds["optimizer"].get("type", "?") if isinstance(ds["optimizer"], dict) else "?"
        warnings.append(f"the DeepSpeed config has an optimizer block ({kind}): it overrides --optim.")
    return warnings


def validate_args(ns: argparse.Namespace, *, cuda: bool | None = None) -> list[str]:
    """Check everything, adjust machine-dependent settings in place, return all problems.

    Sets ns.quant_method and ns.compute_dtype (resolved), ns.notes (log lines).
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    problems: list[str] = []
    ns.notes = []
    if ns.q_lora and not ns.use_lora:
        ns.use_lora = True  # Q-LoRA is LoRA on a quantized base
    _check_paths(ns, problems)
    if ns.model_name_or_path and os.path.isdir(os.path.expanduser(ns.model_name_or_path)):
        # The adapter records this string as its base: make it work from any directory.
        ns.model_name_or_path = os.path.abspath(os.path.expanduser(ns.model_name_or_path))
    _check_values(ns, problems)

    ns.quant_method = None
    if ns.model_name_or_path and (ns.q_lora or os.path.isdir(ns.model_name_or_path)):
        try:
            checkpoint = checkpoint_quant_method(ns.model_name_or_path, ns.trust_remote_code)
            if ns.quantization in CHOICES["quantization"]:
                ns.quant_method = resolve_quant_method(ns.q_lora, ns.quantization, checkpoint)
        except UsageError as e:
            problems.extend(e.problems)
        except (OSError, ValueError) as e:
            problems.append(f"--model_name_or_path {ns.model_name_or_path!r}: cannot read its config: {e}")
    missing = require_library(ns.quant_method)
    if missing:
        problems.append(missing)
    if ns.quant_method == "gptq" and ns.lora_modules_to_save:
        from qlaunch.model import GPTQ_EMBEDDINGS

        problems.append(GPTQ_EMBEDDINGS.format(modules=" ".join(ns.lora_modules_to_save)))

    precision = resolve_precision(ns.quant_method, bool(ns.fp16), bool(ns.bf16), cuda=cuda)
    problems.extend(precision.problems)
    ns.notes += precision.notes
    ns.warnings = list(precision.warnings)
    ns.fp16, ns.bf16, ns.compute_dtype = precision.fp16, precision.bf16, precision.compute_dtype
    if ns.deepspeed:
        ds_config = read_deepspeed_config(ns.deepspeed)
        ns.warnings += deepspeed_config_warnings(ds_config)
        if zero_stage(ds_config) == 3:
            if ns.quant_method == "gptq":
                problems.append(GPTQ_ZERO3)
            elif ns.quant_method in ("nf4", "fp4") and not ns.bnb_4bit_quant_storage:
                # ZeRO-3 flattens and shards parameters of one dtype; packed 4-bit weights stored
                # as the compute dtype can be sharded like the rest (transformers/peft's recipe).
                ns.bnb_4bit_quant_storage = str(ns.compute_dtype).replace("torch.", "")
                ns.notes.append(f"ZeRO-3 with {ns.quant_method.upper()}: 4-bit weights stored as "
                                f"{ns.bnb_4bit_quant_storage} (--bnb_4bit_quant_storage) so ZeRO-3 can shard them.")

    if not cuda:
        ns.use_cpu = True  # without it, torchrun workers train independent world-size-1 copies
        if world_size() > 1 and not ns.ddp_backend:
            ns.ddp_backend = "gloo"
    if ns.use_lora and ns.ddp_find_unused_parameters is None:
        ns.ddp_find_unused_parameters = False  # frozen base: DDP must not wait for grads that never come
    ckpt = ns.activation_checkpointing or ns.gradient_checkpointing
    if ckpt and not (ns.activation_checkpointing_kwargs or ns.gradient_checkpointing_kwargs):
        ns.activation_checkpointing_kwargs = {"use_reentrant": False}
    return problems


def check(ns: argparse.Namespace) -> None:
    problems = validate_args(ns)
    if problems:
        raise UsageError(problems)
