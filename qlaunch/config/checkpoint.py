"""What the checkpoint declares, read before anything loads: its config.json (as JSON: no remote code,
no weights), the quantization it carries, the quantization a run will use, and whether the library
that quantization needs is installed."""
from __future__ import annotations

import importlib.util
import json
import os

from qlaunch.config.errors import UsageError

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

def read_config(path: str) -> dict:
    """config.json of a local directory (or of a hub id already in the local cache), as JSON."""
    if os.path.isdir(os.path.expanduser(path)):
        file = os.path.join(os.path.expanduser(path), "config.json")
    else:
        try:
            from huggingface_hub import hf_hub_download

            file = hf_hub_download(path, "config.json")
        except Exception as e:  # offline and not cached, or not a repo id
            raise UsageError(f"--model_name_or_path {path!r}: no local directory and its config.json could not be "
                             f"fetched ({type(e).__name__}); pass a directory holding the model's config.json.") from None
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model_name_or_path {path!r}: cannot read config.json ({e}); pass a directory "
                         "with the checkpoint's config.json.") from None
    if not isinstance(config, dict):
        raise UsageError(f"--model_name_or_path {path!r}: config.json is not a JSON object.")
    quantize_config = os.path.join(os.path.dirname(file), "quantize_config.json")
    if "quantization_config" not in config and os.path.isfile(quantize_config):
        with open(quantize_config, encoding="utf-8") as f:  # older GPTQ checkpoints keep it beside
            config["quantization_config"] = {"quant_method": "gptq", **json.load(f)}
    return config

def checkpoint_quant_method(model_name_or_path: str, trust_remote_code: bool = False) -> str | None:
    """The quant_method the checkpoint itself declares (e.g. "gptq"), or None."""
    local = os.path.join(os.path.expanduser(model_name_or_path), "config.json")
    if os.path.isfile(local):  # read as JSON: no remote code runs, a config-only directory works
        with open(local, encoding="utf-8") as f:
            qc = json.load(f).get("quantization_config")
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
        qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)).lower() if method else None

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
