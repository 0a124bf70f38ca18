"""NF4 storage: real 4-bit codes, and bits/param counted with all quantization state."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "bench"))
from nf4_bits import quantize  # noqa: E402

from qlaunch.model.footprint import linear4bit_storage, quantized_storage

# The NF4 code book from the QLoRA paper (Dettmers et al. 2023, appendix E).
NF4_CODE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0]


def test_nf4_code_book_is_the_published_one():
    layer = quantize((64, 64), "nf4", True)
    assert torch.allclose(layer.weight.quant_state.code, torch.tensor(NF4_CODE), atol=1e-7)


@pytest.mark.parametrize("shape", [(1024, 1024), (2048, 1024)])
def test_nf4_double_quant_bits_at_most_4_14_on_large_projections(shape):
    info = linear4bit_storage(quantize(shape, "nf4", True))
    assert info["double_quant"] and info["blocksize"] == 64
    assert 4.12 < info["bits_per_param"] <= 4.14


def test_without_double_quant_costs_half_a_bit():
    info = linear4bit_storage(quantize((1024, 1024), "nf4", False))
    assert info["bits_per_param"] == pytest.approx(4.5, abs=1e-3)


def test_tiny_layers_report_their_fixed_state_honestly():
    info = linear4bit_storage(quantize((64, 64), "nf4", True))
    assert info["bits_per_param"] > 6  # 1,160 bytes of state for 4,096 params


def test_dequantized_weights_close_to_original():
    import bitsandbytes.functional as F

    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(1)) * 0.02
    layer = quantize((256, 256), "nf4", True, weight=w.clone())
    restored = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    relative = (restored - w).norm() / w.norm()
    assert 0.01 < relative < 0.15  # really 4-bit (lossy), yet faithful


def test_model_summary_on_demo_nf4(demo):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(demo["model"], quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32), device_map={"": "cpu"})
    summary = quantized_storage(model)
    assert summary["layers"] == 14
    assert summary["bits_per_param"] > 4.0
