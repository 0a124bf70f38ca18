"""Tiny MoE models built locally (Qwen2-MoE, Qwen3-MoE, Mixtral classes) with the demo tokenizer."""
from __future__ import annotations

import os

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512)
KINDS = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                       shared_expert_intermediate_size=64)),
}


def build_moe(kind: str, root: str, tokenizer_dir: str, router_logits: bool = True) -> str:
    """A seeded tiny MoE model of `kind` under root/kind (built once); returns its directory."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    path = os.path.join(root, kind)
    if os.path.isdir(path):
        return path
    config_cls, model_cls, extra = KINDS[kind]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = getattr(transformers, config_cls)(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, output_router_logits=router_logits, **COMMON, **extra)
    torch.manual_seed(0)
    getattr(transformers, model_cls)(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
