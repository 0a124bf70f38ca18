"""Dimensions of the real models the recipes name, written from their published configs (numbers only).

Tests prefer the real config.json files in ../shared/models/configs/ (skipping those that need them
when ../shared is absent); this table lets the recipe test run without them, and a test checks that
it agrees with the real files where both exist.
"""
from __future__ import annotations

import json
import os

SHARED_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "shared", "models", "configs")
GPTQ_INT4 = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}


def _qwen1(h, layers, heads, ffn, vocab, gptq=True):
    config = {"model_type": "qwen", "hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": heads,
              "intermediate_size": ffn, "kv_channels": h // heads, "vocab_size": vocab, "tie_word_embeddings": False}
    return {**config, "quantization_config": dict(GPTQ_INT4)} if gptq else config


def _llama(model_type, h, inter, layers, heads, kv, vocab, tied=False):
    return {"model_type": model_type, "hidden_size": h, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
            "tie_word_embeddings": tied, "max_position_embeddings": 32768}


DIMS = {
    "Qwen/Qwen-1_8B-Chat-Int4": _qwen1(2048, 24, 16, 11008, 151936),
    "Qwen/Qwen-7B-Chat-Int4": _qwen1(4096, 32, 32, 22016, 151936),
    "Qwen/Qwen-14B-Chat-Int4": _qwen1(5120, 40, 40, 27392, 152064),
    "Qwen/Qwen-72B-Chat-Int4": _qwen1(8192, 80, 64, 49152, 152064),
    "Qwen/Qwen-7B": _qwen1(4096, 32, 32, 22016, 151936, gptq=False),
    "Qwen/Qwen-14B": _qwen1(5120, 40, 40, 27392, 152064, gptq=False),
    "Qwen/Qwen2-7B-Instruct": _llama("qwen2", 3584, 18944, 28, 28, 4, 152064),
    "Qwen/Qwen2.5-7B-Instruct": _llama("qwen2", 3584, 18944, 28, 28, 4, 152064),
    "meta-llama/Meta-Llama-3-8B-Instruct": _llama("llama", 4096, 14336, 32, 32, 8, 128256),
    "meta-llama/Meta-Llama-3-70B-Instruct": _llama("llama", 8192, 28672, 80, 64, 8, 128256),
    "meta-llama/Llama-2-70b-hf": _llama("llama", 8192, 28672, 80, 64, 8, 32000),
    "mistralai/Mistral-7B-Instruct-v0.3": _llama("mistral", 4096, 14336, 32, 32, 8, 32768),
    "Qwen/Qwen3-30B-A3B": {**_llama("qwen3_moe", 2048, 6144, 48, 32, 4, 151936), "head_dim": 128,
                           "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                           "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []},
    "mistralai/Mixtral-8x7B-Instruct-v0.1": {**_llama("mixtral", 4096, 14336, 32, 32, 8, 32000),
                                             "num_local_experts": 8, "num_experts_per_tok": 2},
}
# The real config.json (and the Int4 variant's quantization_config added) where ../shared has it.
SHARED = {
    "Qwen/Qwen-1_8B-Chat-Int4": ("qwen-1_8b-chat.config.json", GPTQ_INT4),
    "Qwen/Qwen-7B-Chat-Int4": ("qwen-vl-chat-int4.config.json", None),  # Qwen-7B's language-model shape
    "Qwen/Qwen-7B": ("qwen-7b.config.json", None),
    "Qwen/Qwen2-7B-Instruct": ("qwen2-7b-instruct.config.json", None),
    "Qwen/Qwen2.5-7B-Instruct": ("qwen2.5-7b-instruct.config.json", None),
    "meta-llama/Meta-Llama-3-8B-Instruct": ("llama-3-8b-instruct.config.json", None),
    "mistralai/Mistral-7B-Instruct-v0.3": ("mistral-7b-instruct-v0.3.config.json", None),
}


def shared_config(model_id: str) -> dict | None:
    name, quant = SHARED.get(model_id, (None, None))
    path = os.path.join(SHARED_CONFIGS, name) if name else None
    if not path or not os.path.isfile(path):
        return None
    with open(path) as f:
        config = json.load(f)
    if quant:
        config["quantization_config"] = dict(quant)
    return config


def config_dir(model_id: str, root: str, prefer_shared: bool = True) -> str:
    """A directory holding only config.json for model_id (the real one if ../shared has it)."""
    config = (shared_config(model_id) if prefer_shared else None) or DIMS[model_id]
    path = os.path.join(root, model_id.replace("/", "--"))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path
