"""A random Llama built locally with the demo tokenizer (benchmarks and GPU tests: no hub)."""
from __future__ import annotations

import os


def random_llama(root: str, name: str, dims: dict) -> tuple[str, dict]:
    """(model directory, demo paths): a seeded random LlamaForCausalLM of `dims` under root/name,
    built once, with the demo model's tokenizer; the demo (model and data) under root/demo."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlaunch.demo import build_demo

    demo = build_demo(os.path.join(root, "demo"))
    model = os.path.join(root, name)
    if not os.path.isdir(model):
        tokenizer = AutoTokenizer.from_pretrained(demo["model"])
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                             max_position_embeddings=4096, tie_word_embeddings=False, **dims)
        LlamaForCausalLM(config).save_pretrained(model)
        tokenizer.save_pretrained(model)
    return model, demo
