"""Build a tiny GPTQ v1 Int4 checkpoint from a tiny full-precision HF causal LM, by hand.

Tests (and the CPU demo) need a GPTQ base like ``Qwen/Qwen-7B-Chat-Int4`` but nothing can be
downloaded and real GPTQ calibration is slow. So :func:`make_gptq_checkpoint` quantizes every
linear projection inside the decoder blocks with plain round-to-nearest (RTN) and packs the result
in the GPTQ **v1** on-disk layout that AutoGPTQ wrote and that gptqmodel / transformers still load.
Writing needs only torch + safetensors; *loading* the result needs gptqmodel (+ optimum).

The output is deterministic: same source directory -> byte-identical files.

GPTQ v1 layout of one quantized ``nn.Linear(in_features=I, out_features=O)`` with ``bits=b``,
``group_size=g``, ``pack = 32 // b`` codes per int32 word, ``G = I // g`` groups:

    <name>.qweight  int32 [I // pack, O]  codes packed along the *input* dim:
                    qweight[r, o] = sum_k  q[r*pack + k, o] << (b*k)      (low bits first)
    <name>.qzeros   int32 [G, O // pack]  zero points packed along the *output* dim, same bit order;
                    **v1 stores zero - 1** (AutoGPTQ's historical off-by-one; gptqmodel adds the 1
                    back when it converts v1 -> v2 at load time)
    <name>.scales   fp16  [G, O]
    <name>.g_idx    int32 [I]         group of each input row: i // g (no act-order)
    <name>.bias     fp16  [O]         only when the linear has a bias (Qwen2 q/k/v)

and the dequantized weight (transposed, [I, O]) is ``scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])``.

Symmetric RTN as in GPTQ's quantizer (``sym=True``): per group and output column,
``scale = 2 * max|w| / (2^b - 1)``, ``zero = 2^(b-1)`` (8 for 4 bits),
``q = clamp(round(w / scale) + zero, 0, 2^b - 1)``.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["make_gptq_checkpoint", "quantize_rtn_sym", "pack_gptq_v1", "dequantize_gptq_v1"]

# Files copied unchanged from the source directory (tokenizer and generation settings).
_COPY_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
)

# A linear weight inside a repeated decoder block, e.g. "model.layers.3.mlp.up_proj.weight".
# optimum's GPTQ loader replaces *every* nn.Linear under the block list (model.layers) by a
# quant-linear module, so every one of them must be quantized here; lm_head / embeddings are not.
_BLOCK_LINEAR = re.compile(r"^(?P<prefix>.*\.layers\.\d+\..+)\.weight$")


def quantize_rtn_sym(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Round-to-nearest symmetric quantization of an ``nn.Linear`` weight ``[O, I]``.

    Returns ``(codes [I, O] int64 in 0..2^bits-1, scales [G, O] fp16, zero)``. The scales are rounded to
    fp16 *before* computing the codes, so the codes are exactly the best choice for the stored scales.
    """
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")
    maxq = 2**bits - 1
    zero = 2 ** (bits - 1)
    w = weight.detach().to(torch.float64).t().contiguous()  # [I, O]: GPTQ works on the transposed weight
    groups = w.reshape(in_features // group_size, group_size, out_features)  # [G, g, O]
    amax = groups.abs().amax(dim=1)  # [G, O]
    scales = (2.0 * amax / maxq).clamp_min(1e-8).to(torch.float16)  # fp16 as stored; never 0
    codes = torch.round(groups / scales.to(torch.float64)[:, None, :]) + zero  # round half to even
    codes = codes.clamp_(0, maxq).to(torch.int64).reshape(in_features, out_features)
    return codes, scales, zero


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the same 32 bits as int32 (two's complement), explicitly."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_gptq_v1(codes: torch.Tensor, zero: int, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """Pack ``codes [I, O]`` (and a constant symmetric ``zero``) into v1 qweight/qzeros/g_idx."""
    if 32 % bits:
        raise ValueError(f"bits={bits}: only 2, 4 and 8 bits pack evenly into int32 words")
    pack = 32 // bits
    in_features, out_features = codes.shape
    if in_features % pack or out_features % pack:
        raise ValueError(f"linear {in_features}x{out_features} is not a multiple of {pack} in both dims")
    shifts = torch.arange(pack, dtype=torch.int64) * bits  # k-th code of a word sits at bits*k

    # qweight: consecutive input rows r*pack .. r*pack+pack-1 share one word per output column.
    rows = codes.reshape(in_features // pack, pack, out_features)
    qweight = (rows << shifts[None, :, None]).sum(dim=1)

    # qzeros: v1 stores (zero - 1); consecutive output columns share one word per group.
    n_groups = in_features // group_size
    zeros_v1 = torch.full((n_groups, out_features // pack, pack), zero - 1, dtype=torch.int64)
    qzeros = (zeros_v1 << shifts[None, None, :]).sum(dim=2)

    g_idx = torch.arange(in_features, dtype=torch.int32) // group_size
    return {"qweight": _to_int32(qweight), "qzeros": _to_int32(qzeros), "g_idx": g_idx}


def dequantize_gptq_v1(qweight, qzeros, scales, g_idx, bits: int = 4) -> torch.Tensor:
    """Reference unpacking of a v1 layer back to an ``nn.Linear``-shaped fp32 weight ``[O, I]``."""
    pack = 32 // bits
    mask = 2**bits - 1
    shifts = torch.arange(pack, dtype=torch.int64) * bits
    qw = qweight.to(torch.int64) & 0xFFFFFFFF
    codes = ((qw[:, None, :] >> shifts[None, :, None]) & mask).reshape(-1, qweight.shape[1])  # [I, O]
    qz = qzeros.to(torch.int64) & 0xFFFFFFFF
    zeros = ((qz[:, :, None] >> shifts[None, None, :]) & mask).reshape(qzeros.shape[0], -1) + 1  # v1: +1
    g = g_idx.long()
    w = scales.float()[g] * (codes - zeros[g]).float()
    return w.t().contiguous()


def _read_state_dict(src_dir: str) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, in file order."""
    index = os.path.join(src_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = os.path.join(src_dir, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: make_gptq_checkpoint needs a safetensors checkpoint (save_pretrained)")
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def make_gptq_checkpoint(
    src_dir: str,
    out_dir: str,
    *,
    bits: int = 4,
    group_size: int = 32,
    seed: int = 0,
    dense_dtype: torch.dtype = torch.float16,
) -> str:
    """Write a GPTQ v1 checkpoint of the model saved in ``src_dir`` to ``out_dir``; return ``out_dir``.

    ``src_dir``: a ``save_pretrained`` directory of a small Llama / Qwen2-style causal LM (safetensors)
    with its tokenizer. Every ``nn.Linear`` inside ``model.layers.N`` is quantized (RTN, symmetric,
    ``desc_act=False``); embeddings, norms and ``lm_head`` are kept, cast to ``dense_dtype`` (fp16 like
    real GPTQ checkpoints such as Qwen-7B-Chat-Int4; pass ``torch.float32`` to keep them exact).
    ``seed`` is accepted for API stability: RTN uses no randomness, the output depends only on the input.
    """
    del seed  # RTN is deterministic; nothing is sampled.
    if bits != 4:
        # gptqmodel's CPU kernels (TorchAtenLinear) only do 4 bits; other widths are untested here.
        raise ValueError("make_gptq_checkpoint: only bits=4 is supported")

    with open(os.path.join(src_dir, "config.json")) as f:
        config = json.load(f)
    if "quantization_config" in config:
        raise ValueError(f"{src_dir} is already quantized ({config['quantization_config'].get('quant_method')})")

    out_tensors: dict[str, torch.Tensor] = {}
    n_quantized = 0
    for key, tensor in _read_state_dict(src_dir).items():
        match = _BLOCK_LINEAR.match(key)
        if match and tensor.dim() == 2:
            prefix = match["prefix"]
            codes, scales, zero = quantize_rtn_sym(tensor, bits, group_size)
            packed = pack_gptq_v1(codes, zero, bits, group_size)
            out_tensors[f"{prefix}.qweight"] = packed["qweight"]
            out_tensors[f"{prefix}.qzeros"] = packed["qzeros"]
            out_tensors[f"{prefix}.scales"] = scales
            out_tensors[f"{prefix}.g_idx"] = packed["g_idx"]
            n_quantized += 1
        elif tensor.is_floating_point():
            # Embeddings, norms, lm_head and the biases of quantized linears (Qwen2 q/k/v):
            # the biases must stay under "<prefix>.bias", which is where quant-linear modules load them.
            out_tensors[key] = tensor.to(dense_dtype)
        else:
            out_tensors[key] = tensor
    if n_quantized == 0:
        raise ValueError(f"{src_dir}: found no linear weights under '*.layers.N.*' to quantize")

    if os.path.abspath(out_dir) == os.path.abspath(src_dir):
        raise ValueError("make_gptq_checkpoint: out_dir must differ from src_dir")
    os.makedirs(out_dir, exist_ok=True)
    # A rebuild into an old directory must not leave stale weight shards that from_pretrained would pick up.
    for name in os.listdir(out_dir):
        if name.endswith(".safetensors") or name == "model.safetensors.index.json":
            os.remove(os.path.join(out_dir, name))
    # Sorted keys and fixed metadata: safetensors then writes identical bytes on every run.
    out_tensors = {k: out_tensors[k].contiguous() for k in sorted(out_tensors)}
    save_file(out_tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})

    quant_config = {
        # What transformers/optimum read (GPTQConfig fields). No "backend" key: the kernel is a
        # load-time choice (GPTQConfig(backend=...)), not a property of the checkpoint.
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": False,
        "sym": True,
        "damp_percent": 0.01,
        "true_sequential": True,
        "checkpoint_format": "gptq",  # v1 on-disk format (zero points stored minus one)
        "format": "gptq",
        "pack_dtype": "int32",
        "lm_head": False,
        "meta": {"quantizer": ["qlaunch.model.gptq_pack:rtn"]},
    }
    config["quantization_config"] = quant_config
    config["dtype"] = str(dense_dtype).replace("torch.", "")
    config.pop("torch_dtype", None)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    # gptqmodel's own loader (GPTQModel.load) reads quantize_config.json; transformers reads config.json.
    with open(os.path.join(out_dir, "quantize_config.json"), "w") as f:
        json.dump(quant_config, f, indent=2, sort_keys=True)
        f.write("\n")

    for name in _COPY_FILES:
        path = os.path.join(src_dir, name)
        if os.path.exists(path):
            shutil.copyfile(path, os.path.join(out_dir, name))
    return out_dir
