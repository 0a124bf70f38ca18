"""ZeRO-3 partitioning of a 4-bit base before the engine places it (qlaunch/model/zero3_init.py): the parts
that decide dtypes and placement, with the configs a GPU run would pass."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qlaunch.model.zero3_init import _one_at_a_time, engine_param_dtype, move_unpartitioned_state

pytest.importorskip("deepspeed")


@pytest.mark.parametrize(("config", "dtype"), [
    ({"fp16": {"enabled": True}, "bf16": {"enabled": False}}, torch.float16),
    ({"fp16": {"enabled": False}, "bf16": {"enabled": True}}, torch.bfloat16),
    ({"bf16": {"enabled": "true"}}, torch.bfloat16),
    ({"fp16": {"enabled": False}, "bf16": {"enabled": False}}, None),
    ({}, None),
])
def test_the_cast_follows_the_engine_s_precision_blocks(config, dtype):
    assert engine_param_dtype(config) is dtype


class Tagged(nn.Parameter):
    """Stands for bitsandbytes' Params4bit: a Parameter subclass whose attributes the kernels need."""


def test_meta_parameters_become_empty_twins_in_the_engine_dtype_and_real_ones_are_cast():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2), nn.Linear(2, 3, bias=False))
    trained = model[0].weight.detach().clone()
    model[1].to("meta")
    model[1].weight = Tagged(model[1].weight.data, requires_grad=False)
    model[1].weight.quant_state = "state"
    model[2].weight = model[1].weight  # tied: both owners must get the one twin
    seen = []
    for param in _one_at_a_time(model, torch.bfloat16, torch.device("cpu")):
        if not hasattr(param, "ds_id"):  # zero.Init skips what it converted (the tied twin comes back once)
            param.ds_id = len(seen)
            seen.append(param)
    assert len(seen) == 4 and all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in seen)
    assert torch.equal(model[0].weight, trained.to(torch.bfloat16))  # the values rank 0 broadcasts
    twin = model[1].weight
    assert model[2].weight is twin and type(twin) is Tagged and twin.quant_state == "state"
    assert twin.shape == (2, 3) and not twin.requires_grad and twin.ds_id == 2


def test_integer_and_already_partitioned_parameters_are_left_alone():
    codes = nn.Parameter(torch.arange(6, dtype=torch.int32), requires_grad=False)
    done = nn.Parameter(torch.zeros(0, dtype=torch.float32))
    done.ds_id = 7
    holder = nn.Module()
    holder.codes, holder.done = codes, done
    kept = list(_one_at_a_time(holder, torch.float16, torch.device("cpu")))
    assert kept[0].dtype == torch.int32 and torch.equal(kept[0], torch.arange(6, dtype=torch.int32))
    assert kept[1].dtype == torch.float32


def test_buffers_and_quantization_states_follow_to_the_device():
    class State:
        def __init__(self):
            self.devices = []

        def to(self, device):
            self.devices.append(device)

    model = nn.Sequential(nn.Linear(2, 2))
    model[0].register_buffer("inv_freq", torch.ones(2))
    model[0].weight.quant_state = State()
    assert move_unpartitioned_state(model, torch.device("meta")) == 2
    assert model[0].inv_freq.device.type == "meta" and model[0].weight.quant_state.devices == [torch.device("meta")]
