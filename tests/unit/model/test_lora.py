"""Parameter counts of a 4-bit base: what transformers counts, whatever the 4-bit storage dtype."""
from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("storage", [None, torch.bfloat16, torch.float32])
def test_a_4bit_base_counts_the_weights_it_stands_for(demo, storage):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlaunch.model.lora import count_parameters

    full = AutoModelForCausalLM.from_pretrained(demo["model"])
    kwargs = {"bnb_4bit_quant_storage": storage} if storage else {}
    nf4 = AutoModelForCausalLM.from_pretrained(
        demo["model"], device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32, **kwargs))
    packed = sum(p.numel() for p in nf4.parameters())
    assert packed < full.num_parameters()  # the raw numel undercounts: 1/2 (uint8) or 1/4, 1/8 of the weights
    for p in nf4.parameters():
        p.requires_grad_(False)
    assert count_parameters(nf4) == (0, full.num_parameters()) == (0, nf4.num_parameters())
    nf4.lm_head.weight.requires_grad_(True)
    assert count_parameters(nf4)[0] == nf4.lm_head.weight.numel()
