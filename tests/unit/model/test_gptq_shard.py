"""GPTQ packed weights as shardable parameters (qlaunch/model/gptq_shard.py): same bytes, same numbers."""
from __future__ import annotations

import pickle
import types

import pytest
import torch

pytest.importorskip("gptqmodel", reason="GPTQ tests need gptqmodel: pip install 'qlaunch[gptq]'")

from qlaunch.model.gptq_shard import (  # noqa: E402
    PACKED,
    SUFFIX,
    base_classes,
    from_storage,
    make_shardable,
    packed_bytes,
    restore_classes,
    to_storage,
    unalias_peft_layers,
)

pytestmark = pytest.mark.gptq


def raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape, dtype", [((16, 64), torch.int32), ((3, 5), torch.float16), ((7,), torch.int32),
                                          ((1, 3), torch.float16)])
def test_storage_round_trip_keeps_every_byte(storage, shape, dtype):
    # every bit pattern, NaN payloads of the storage dtype included
    source = torch.randint(-2**15, 2**15, shape, dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    source = source.to(dtype) if dtype != torch.float16 else source.to(torch.int16).view(torch.float16)
    stored = to_storage(source, storage)
    assert stored.dtype == storage and stored.dim() == 1
    back = from_storage(stored, dtype, source.shape)
    assert back.dtype == dtype and back.shape == source.shape and raw(back) == raw(source)
    assert back.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr()  # a view, not a copy


def load(path):
    from transformers import AutoModelForCausalLM

    from qlaunch.model.gptq import gptq_training_config, pin_training_kernels

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=gptq_training_config(),
                                                 device_map={"": "cpu"}, dtype=torch.float32)
    pin_training_kernels(model)
    return model


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights="gaussian", lora_dropout=0.0))


@pytest.fixture(scope="module")
def gptq_path(demo, tmp_path_factory):
    from qlaunch.model.gptq_pack import make_gptq_checkpoint

    return make_gptq_checkpoint(demo["model"], str(tmp_path_factory.mktemp("gptq_shard") / "model"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_shardable_layers_compute_exactly_what_the_buffers_did(gptq_path, dtype):
    reference, shardable = with_lora(load(gptq_path)), load(gptq_path)
    before = {n: {k: raw(t) for k, t in d.items()} for n, d in packed_bytes(shardable).items()}
    assert make_shardable(shardable, dtype) == 14
    shardable = with_lora(shardable)  # peft assigns each layer's qweight to itself: tolerated
    assert unalias_peft_layers(shardable) == 6  # q, v, down in 2 blocks

    layers = [m for m in shardable.modules() if hasattr(m, "_packed_layout")]
    assert len(layers) == 14
    for layer in layers:
        assert not any(key in layer._buffers for key in PACKED)
        for key in PACKED:
            stored = layer._parameters[key + SUFFIX]
            assert stored.dtype == dtype and not stored.requires_grad
    after = {n: {k: raw(t) for k, t in d.items()} for n, d in packed_bytes(shardable).items()}
    assert {n.removeprefix("base_model.model.").removesuffix(".base_layer"): d for n, d in after.items()} == before

    ids = torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (reference, shardable):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (reference, shardable)]
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    # the packed tensors are weights nobody trains, and no checkpoint names them twice
    assert all("quant_linear_module" not in n for n in shardable.state_dict())


def test_a_shard_reads_as_metadata_and_a_replacement_is_refused(gptq_path):
    model = load(gptq_path)
    make_shardable(model, torch.float32)
    layer = next(m for m in model.modules() if hasattr(m, "_packed_layout"))
    shape = layer.qweight.shape
    layer._parameters["qweight" + SUFFIX].data = torch.empty(0)  # what ZeRO-3 leaves outside forward
    assert layer.qweight.device.type == "meta" and layer.qweight.shape == shape
    assert layer.qweight.dtype == torch.int32
    with pytest.raises(RuntimeError, match="sharded parameters"):
        layer.scales = torch.zeros_like(layer.scales)  # gptqmodel's inference repacking


def test_the_shardable_classes_travel_by_their_gptqmodel_names(gptq_path):
    model = load(gptq_path)
    make_shardable(model, torch.float32)
    kinds = {type(m).__name__ for m in model.modules() if hasattr(m, "_packed_layout")}
    assert kinds == {"ShardableTorchAtenLinear"}
    base_classes(model)
    model.quantize_config = types.SimpleNamespace(**vars(model.quantize_config))  # as skeleton_of sends it
    received = pickle.loads(pickle.dumps(model))  # the run-time subclass could not be found by name
    assert restore_classes(received) == 14
    assert {type(m).__name__ for m in received.modules() if hasattr(m, "_packed_layout")} == kinds
    ids = torch.arange(1, 17).unsqueeze(0)
    restore_classes(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, received(input_ids=ids).logits)


def test_the_skeleton_of_a_shardable_gptq_base_carries_no_packed_bytes(gptq_path):
    from qlaunch.model.rank0_load import skeleton_of

    model = load(gptq_path)
    make_shardable(model, torch.float32)
    sent = pickle.dumps(skeleton_of(model))  # optimum's quantize_config (a local class) travels too
    received = pickle.loads(sent)
    restore_classes(received)
    for name, param in received.named_parameters():
        assert param.device.type == "meta", name
    packed = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.endswith(SUFFIX))
    print(f"skeleton {len(sent)} bytes; packed weights {packed} bytes")
    assert len(sent) < packed / 2
