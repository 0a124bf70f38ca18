"""Load the tokenizer and the base model (full precision | bitsandbytes NF4/FP4 | GPTQ Int4), attach LoRA.

Which quantization applies is read from flags and from the checkpoint's own config,
never from substrings of the model path.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from qlaunch.data.tokenize import ensure_chat_template, ensure_pad_token
from qlaunch.errors import UsageError

log = logging.getLogger("qlaunch")

INSTALL_HINT = {
    "bitsandbytes": "pip install 'qlaunch[bnb]'  (or: pip install 'bitsandbytes>=0.48')",
    "gptqmodel": "pip install 'qlaunch[gptq]'  (or: pip install 'gptqmodel>=7.6' optimum)",
}
GPTQ_EMBEDDINGS = (
    "--lora_modules_to_save {modules}: GPTQ Int4 Q-LoRA cannot train embeddings or lm_head in full. "
    "GPTQ bases load in fp16, so those copies would be fp16 parameters that fp16 mixed precision cannot "
    "update (GradScaler refuses fp16 gradients), and they would store full-size weights in the adapter. "
    "Drop --lora_modules_to_save (Qwen's Int4 recipe trains LoRA only)."
)


def checkpoint_quant_method(model_name_or_path: str, trust_remote_code: bool = False) -> str | None:
    """The quant_method the checkpoint itself declares (e.g. "gptq"), or None."""
    local = os.path.join(os.path.expanduser(model_name_or_path), "config.json")
    if os.path.isfile(local):  # read as JSON: no remote code runs, a config-only directory works
        import json

        with open(local, encoding="utf-8") as f:
            qc = json.load(f).get("quantization_config")
    else:
        config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
        qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)).lower() if method else None


def unquantized_config(config):
    """The same architecture config without its quantization_config (for meta or full-precision copies)."""
    values = {k: v for k, v in config.to_dict().items() if k != "quantization_config"}
    return config.__class__.from_dict(values)


def resolve_quant_method(q_lora: bool, quantization: str, checkpoint_method: str | None) -> str | None:
    """None (full-precision base), "nf4", "fp4" or "gptq". Raises UsageError for contradictions."""
    if not q_lora:
        if checkpoint_method == "gptq":
            raise UsageError(
                "the base checkpoint is GPTQ-quantized (its config has quantization_config.quant_method=gptq): "
                "pass --q_lora to train LoRA adapters on it."
            )
        return None
    if quantization == "auto":
        return "gptq" if checkpoint_method == "gptq" else "nf4"
    if quantization == "gptq" and checkpoint_method != "gptq":
        raise UsageError(
            "--quantization gptq: the checkpoint has no GPTQ quantization_config. Use a GPTQ Int4 checkpoint "
            "(e.g. Qwen/Qwen-7B-Chat-Int4), or --quantization nf4 to quantize this one on load."
        )
    if quantization in ("nf4", "fp4") and checkpoint_method == "gptq":
        raise UsageError(
            f"--quantization {quantization}: the checkpoint is already GPTQ-quantized. "
            "Use --quantization gptq (or auto)."
        )
    return quantization


def require_library(quant_method: str | None) -> str | None:
    """A problem message when a library the quantization needs is not installed."""
    # GPTQ loading goes through optimum too; without gptqmodel it fails deep inside optimum (NameError).
    packages = {"nf4": ["bitsandbytes"], "fp4": ["bitsandbytes"], "gptq": ["gptqmodel", "optimum"]}
    missing = [p for p in packages.get(quant_method or "", []) if importlib.util.find_spec(p) is None]
    if missing:
        hint = INSTALL_HINT["gptqmodel" if quant_method == "gptq" else "bitsandbytes"]
        return f"--q_lora with {quant_method} needs {' and '.join(missing)}, not installed: {hint}"
    return None


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


def quantization_config(quant_method: str | None, compute_dtype: torch.dtype, lora_args):
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
        from qlaunch.gptq import gptq_training_config

        return gptq_training_config()
    return None


def device_map_for(quant_method: str | None, use_cpu: bool, zero3: bool):
    """Quantized weights are placed at load time (the kernel is chosen for that device): each
    DDP / ZeRO-2 rank puts its copy on its own GPU. Full-precision bases and ZeRO-3 (which
    partitions weights itself) load without a device map."""
    if quant_method is None or zero3:
        return None
    if use_cpu or not torch.cuda.is_available():
        return {"": "cpu"}
    return {"": int(os.environ.get("LOCAL_RANK", 0))}


def load_base_model(
    model_args, lora_args, quant_method: str | None, compute_dtype: torch.dtype, *, use_cpu: bool, zero3: bool = False,
    load_dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    kwargs = {
        "trust_remote_code": model_args.trust_remote_code,
        "dtype": load_dtype or compute_dtype,
        "quantization_config": quantization_config(quant_method, compute_dtype, lora_args),
        "device_map": device_map_for(quant_method, use_cpu, zero3),
    }
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, **{k: v for k, v in kwargs.items() if v is not None}
    )
    model.config.use_cache = False  # the KV cache is useless in training and breaks checkpointing
    if quant_method == "gptq":
        from qlaunch.gptq import pin_training_kernels

        log.info("GPTQ base: %d quantized layers pinned to the trainable kernel path.", pin_training_kernels(model))
    return model


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
        return PeftModel.from_pretrained(model, lora_args.lora_weight_path, is_trainable=True)

    targets = lora_args.lora_target_modules or detect_lora_targets(model)
    log.info("LoRA target modules: %s", ", ".join(targets))
    config = LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=targets,
        bias=lora_args.lora_bias,
        modules_to_save=lora_args.lora_modules_to_save,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def upcast_trainable_fp16(model: torch.nn.Module) -> int:
    """fp16 trainable parameters → float32 (fp16 mixed precision cannot update fp16 weights). Returns how many."""
    count = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype == torch.float16:
            param.data = param.data.float()
            count += 1
    return count


def numel(param: torch.Tensor) -> int:
    # Under ZeRO-3 a partitioned parameter is an empty placeholder; ds_numel is its real size.
    return getattr(param, "ds_numel", None) or param.numel()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return trainable, total
