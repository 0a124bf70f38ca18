"""The hand-packed GPTQ v1 Int4 test checkpoint (qlaunch.model.gptq_pack).

Writing a checkpoint needs only torch; the tests that *load* it need gptqmodel + optimum and are
marked ``gptq`` (skipped, with the reason, when those are not installed).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os

import pytest
import torch

from qlaunch.model.gptq_pack import dequantize_gptq_v1, make_gptq_checkpoint, pack_gptq_v1, quantize_rtn_sym

HAVE_GPTQ_STACK = importlib.util.find_spec("gptqmodel") is not None and importlib.util.find_spec("optimum") is not None
needs_gptqmodel = pytest.mark.skipif(
    not HAVE_GPTQ_STACK, reason="loading GPTQ checkpoints needs gptqmodel and optimum: pip install 'qlaunch[gptq]'"
)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUP_SIZE = 32

# Measured (transformers 5.23, gptqmodel 7.6.0, CPU): relative L2 logit difference
#   loaded GPTQ model (dequantize path)  vs fp32 model holding the dequantized weights: ~4e-4
#     (fp16 dense weights / fp16 dequant only) -> the packing itself is exact;
#   loaded GPTQ model (int4pack bf16 inference path) vs the same reference:           ~5e-3;
#   loaded GPTQ model vs the unquantized source model:                               ~0.16-0.18
#     (pure 4-bit RTN error on random-init Gaussian weights: ~9% relative error per matrix).
TOL_VS_DEQUANT = 3e-3
TOL_INFERENCE_PATH = 3e-2
TOL_VS_SOURCE = 0.35


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _hash_dir(path: str) -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def _build_source(path: str, arch: str) -> str:
    """A random-init 2-layer Llama / Qwen2 (fp32 safetensors) with a tiny byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

    texts = ["The quick brown fox jumps over the lazy dog.", "GPTQ packs four-bit weights into int32 words."] * 10
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")

    kwargs = dict(
        hidden_size=128,
        num_hidden_layers=2,
        intermediate_size=256,
        vocab_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    config = LlamaConfig(**kwargs) if arch == "llama" else Qwen2Config(**kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # non-zero q/k/v biases (Qwen2) so a lost bias would show in the logits
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.02)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def built(request, tmp_path_factory):
    """(arch, source dir, GPTQ dir) for each architecture."""
    root = tmp_path_factory.mktemp(f"gptq_{request.param}")
    src = _build_source(str(root / "src"), request.param)
    out = make_gptq_checkpoint(src, str(root / "gptq"), bits=4, group_size=GROUP_SIZE)
    return request.param, src, out


# ---------------------------------------------------------------- writing (torch only)


def test_pack_roundtrip_and_v1_zero_convention():
    torch.manual_seed(0)
    weight = torch.randn(64, 96)  # nn.Linear(96 -> 64)
    codes, scales, zero = quantize_rtn_sym(weight, bits=4, group_size=GROUP_SIZE)
    assert zero == 8 and codes.min() >= 0 and codes.max() <= 15
    packed = pack_gptq_v1(codes, zero, bits=4, group_size=GROUP_SIZE)
    assert packed["qweight"].dtype == torch.int32 and packed["qweight"].shape == (96 // 8, 64)
    assert packed["qzeros"].dtype == torch.int32 and packed["qzeros"].shape == (96 // GROUP_SIZE, 64 // 8)
    # GPTQ v1 stores zero - 1 = 7 in every nibble: 0x77777777.
    assert torch.all(packed["qzeros"] == 0x77777777)
    assert torch.equal(packed["g_idx"], torch.arange(96, dtype=torch.int32) // GROUP_SIZE)

    deq = dequantize_gptq_v1(packed["qweight"], packed["qzeros"], scales, packed["g_idx"], bits=4)
    expected = (scales.float().repeat_interleave(GROUP_SIZE, 0) * (codes - zero).float()).t()
    assert torch.equal(deq, expected)
    # Round-to-nearest: every weight is within half a step, except the clipped top code (+amax -> 7).
    step = scales.float().repeat_interleave(GROUP_SIZE, 0).t()
    assert ((deq - weight).abs() <= step * 0.5 + 1e-6).float().mean() > 0.97
    assert ((deq - weight).abs() <= step + 1e-6).all()


def test_builder_is_deterministic(tmp_path):
    src = _build_source(str(tmp_path / "src"), "qwen2")
    a = make_gptq_checkpoint(src, str(tmp_path / "a"))
    b = make_gptq_checkpoint(src, str(tmp_path / "b"))
    hashes_a, hashes_b = _hash_dir(a), _hash_dir(b)
    assert hashes_a == hashes_b
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(hashes_a)

    with open(os.path.join(a, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == GROUP_SIZE
    assert qc["checkpoint_format"] == "gptq" and qc["sym"] is True and qc["desc_act"] is False

    from safetensors import safe_open

    with safe_open(os.path.join(a, "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.qweight").dtype == torch.int32
        assert f.get_tensor("model.layers.0.self_attn.q_proj.scales").dtype == torch.float16
        assert f.get_tensor("model.layers.0.self_attn.q_proj.bias").dtype == torch.float16  # Qwen2 keeps biases
    assert not any(k.endswith("proj.weight") for k in keys)  # every block projection is packed
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= keys  # ...and these are not


# ---------------------------------------------------------------- loading (gptqmodel)


def _load_gptq(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32)


def _pin_train_path(model) -> None:
    """gptqmodel's CPU kernel repacks for inference on a first no-grad eval forward; keep the exact path."""
    for module in model.modules():
        if hasattr(module, "qweight") and hasattr(module, "linear_mode"):
            module.linear_mode = "train"


def _dequantized_reference(src: str, gptq_dir: str):
    """The fp32 source model with every projection replaced by the checkpoint's dequantized weight."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    state = load_file(os.path.join(gptq_dir, "model.safetensors"))
    n = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if f"{name}.qweight" in state:
                module.weight.copy_(
                    dequantize_gptq_v1(
                        state[f"{name}.qweight"], state[f"{name}.qzeros"], state[f"{name}.scales"], state[f"{name}.g_idx"]
                    )
                )
                n += 1
    assert n == 7 * model.config.num_hidden_layers
    return model


def _input_ids():
    return torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.gptq
@needs_gptqmodel
def test_loads_with_quant_linear_projections(built):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from transformers import AutoModelForCausalLM

    arch, src, out = built
    model = _load_gptq(out)
    assert getattr(model, "quantization_method", None) == "gptq"
    for layer in model.model.layers:
        for proj in PROJECTIONS:
            parent = layer.self_attn if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            assert isinstance(getattr(parent, proj), BaseQuantLinear), f"{arch} {proj} not quantized"
    assert type(model.lm_head) is torch.nn.Linear
    assert type(model.model.embed_tokens) is torch.nn.Embedding

    if arch == "qwen2":  # the q/k/v biases must be loaded into the quant-linear modules
        source = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        got = model.model.layers[1].self_attn.k_proj.bias.float()
        want = source.model.layers[1].self_attn.k_proj.bias.half().float()
        assert torch.equal(got, want)


@pytest.mark.gptq
@needs_gptqmodel
def test_logits_match_dequantized_reference_and_source(built):
    from transformers import AutoModelForCausalLM

    arch, src, out = built
    ids = _input_ids()
    with torch.no_grad():
        source_logits = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
        reference_logits = _dequantized_reference(src, out)(ids).logits

        exact = _load_gptq(out)
        _pin_train_path(exact)
        exact_logits = exact(ids).logits

        fast = _load_gptq(out)  # first no-grad eval forward -> int4pack bf16 inference kernel
        fast_logits = fast(ids).logits

    assert _rel(exact_logits, reference_logits) < TOL_VS_DEQUANT, arch
    assert _rel(fast_logits, reference_logits) < TOL_INFERENCE_PATH, arch
    assert _rel(exact_logits, source_logits) < TOL_VS_SOURCE, arch


@pytest.mark.gptq
@needs_gptqmodel
def test_first_no_grad_forward_repacks_unless_pinned(built):
    """Canary for the gptqmodel 7.6 trap: a no-grad eval forward switches the CPU kernel to a
    no-grad bf16 inference path for good (qweight repacked). Pinning linear_mode first avoids it."""
    _, _, out = built
    ids = _input_ids()[:, :8]

    probed = _load_gptq(out)
    layer = probed.model.layers[0].self_attn.q_proj
    if not hasattr(layer, "linear_mode"):
        pytest.skip(f"{type(layer).__name__} has no one-way linear_mode")
    shape = tuple(layer.qweight.shape)
    with torch.no_grad():
        probed(ids)
    assert str(getattr(layer.linear_mode, "value", layer.linear_mode)) == "inference"
    assert tuple(layer.qweight.shape) != shape  # repacked to the int4pack layout

    pinned = _load_gptq(out)
    _pin_train_path(pinned)
    layer = pinned.model.layers[0].self_attn.q_proj
    before = layer.qweight.clone()
    with torch.no_grad():
        pinned(ids)
    assert layer.linear_mode == "train" and torch.equal(layer.qweight, before)
