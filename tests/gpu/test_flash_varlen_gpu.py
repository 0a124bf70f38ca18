"""flash-attention on a packed batch: the collator's flattened row with its varlen arguments
(cu_seq_lens_*, max_length_*) gives the same logits and loss as sdpa on the same rows, where transformers
builds the block-diagonal mask from the restarting positions. Needs CUDA and the flash-attn package:

    python -m pytest tests/gpu/test_flash_varlen_gpu.py -v
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlaunch.data.collate import PaddingCollator
from qlaunch.data.labels import IGNORE_INDEX

pytestmark = pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn")


def rows(seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for lengths in ((37, 20, 5), (61,), (9, 9, 9, 30)):
        ids, labels, pos = [], [], []
        for n in lengths:
            sample = torch.randint(3, 500, (n,), generator=gen).tolist()
            ids += sample
            labels += [IGNORE_INDEX] + sample[1:]
            pos += range(n)
        out.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return out


def test_flash_varlen_equals_sdpa_on_packed_rows():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    sdpa = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    flash = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    flash.load_state_dict(sdpa.state_dict())
    sdpa.config._attn_implementation = "sdpa"
    flash.config._attn_implementation = "flash_attention_2"

    padded = PaddingCollator(0, flatten_packed=False)(rows())
    flat = PaddingCollator(0, flatten_packed=True)(rows())
    assert flat["input_ids"].shape[0] == 1 and "cu_seq_lens_q" in flat
    with torch.no_grad():
        ref = sdpa(**{k: v.cuda() for k, v in padded.items()})
        out = flash(**{k: (v.cuda() if torch.is_tensor(v) else v) for k, v in flat.items()})
    real = padded["labels"] != IGNORE_INDEX  # compare at the real (labelled) positions, row by row
    ref_logits = ref.logits[real.cuda()].float()
    out_logits = out.logits[0][flat["labels"][0].cuda() != IGNORE_INDEX].float()
    assert out_logits.shape == ref_logits.shape
    assert (out_logits - ref_logits).abs().max().item() < 3e-2  # bf16 kernels differ in summation order
    assert abs(out.loss.item() - ref.loss.item()) < 1e-2
