"""The skeleton rank 0 sends the other ranks under FSDP2 + 4-bit: same modules and classes, no weights."""
from __future__ import annotations

import pickle

import pytest
import torch


@pytest.fixture(scope="module")
def nf4_model(demo):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    return AutoModelForCausalLM.from_pretrained(demo["model"], quantization_config=config, device_map={"": "cpu"})


def test_the_skeleton_survives_the_broadcast_with_the_classes_and_states_of_rank_0(nf4_model):
    from bitsandbytes.nn import Linear4bit, Params4bit

    from qlaunch.model.rank0_load import _restore_params4bit, skeleton_of

    def stored(t):  # bytes: packed 4-bit codes viewed as float32 include NaN patterns
        return t.detach().contiguous().view(torch.uint8)

    before = {n: stored(p).clone() for n, p in nf4_model.named_parameters()}
    skeleton = skeleton_of(nf4_model)
    received = pickle.loads(pickle.dumps(skeleton))  # what broadcast_object_list does
    _restore_params4bit(received)

    real = dict(nf4_model.named_parameters())
    got = dict(received.named_parameters())
    assert list(got) == list(real)  # the same order: the scatter walks both in step
    for name, p in got.items():
        assert p.device.type == "meta", name  # no weights travel, none are read
        assert (p.shape, p.dtype, type(p), p.requires_grad) == (real[name].shape, real[name].dtype,
                                                                  type(real[name]), real[name].requires_grad), name
    layers = [m for m in received.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == sum(isinstance(m, Linear4bit) for m in nf4_model.modules()) > 0
    originals = [m for m in nf4_model.modules() if isinstance(m, Linear4bit)]
    for mine, theirs in zip(layers, originals):
        assert isinstance(mine.weight, Params4bit) and mine.weight.bnb_quantized
        assert mine.weight.quant_state is mine.quant_state  # bitsandbytes restores gathered weights from it
        assert torch.equal(mine.quant_state.absmax, theirs.weight.quant_state.absmax)
        assert mine.quant_state.absmax.device.type == "cpu"
    # rank 0's own model is untouched: it still trains with its real weights
    for name, p in nf4_model.named_parameters():
        assert p.device.type == "cpu" and torch.equal(stored(p), before[name]), name
    # the buffers (rotary frequencies) are real: they are small and not all are in a checkpoint
    for name, b in received.named_buffers():
        assert b.device.type == "cpu" and torch.equal(b, dict(nf4_model.named_buffers())[name]), name


def test_skeleton_bytes_are_a_small_part_of_the_4bit_weights(nf4_model):
    from qlaunch.model.rank0_load import skeleton_of

    sent = len(pickle.dumps(skeleton_of(nf4_model)))
    weights = sum(p.numel() * p.element_size() for p in nf4_model.parameters())
    quant_state = sum(t.numel() * t.element_size() for m in nf4_model.modules() if hasattr(m, "quant_state")
                      and m.quant_state is not None for t in m.quant_state.as_dict(packed=True).values()
                      if isinstance(t, torch.Tensor))
    buffers = sum(b.numel() * b.element_size() for b in nf4_model.buffers())
    print(f"skeleton {sent} bytes; weights {weights}; quantization state {quant_state}; buffers {buffers}")
    assert sent < weights / 2 and sent < quant_state + buffers + 200_000  # states + modules' Python objects
