"""A model's shape from its config.json alone: no weights, no tokenizer, no remote code.

The memory model needs the decoder blocks' linear projections (what is quantized and what LoRA
adapts), everything else as one count (embeddings, lm_head, norms, biases), and the dimensions
activations scale with. Architectures transformers knows are instantiated on the meta device
(exact parameter counts, nothing allocated). Qwen(1) (`model_type: qwen`) ships its modelling
code with the checkpoint; it is described here from its own config keys instead of running it.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from qlaunch.config.errors import UsageError
from qlaunch.config.moe import experts_per_token, is_fused_experts


@dataclass(frozen=True)
class Linear:
    """One linear projection of a decoder block (the same in every block)."""

    name: str  # leaf module name, what --lora_target_modules matches (q_proj, c_attn, …)
    n_in: int
    n_out: int
    bias: bool = False


@dataclass(frozen=True)
class Shape:
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # width of one MLP branch
    vocab: int
    tied: bool
    block: tuple[Linear, ...]  # per decoder block
    total_params: int  # every parameter once (tied embeddings once)
    gated_mlp: bool = True  # gate * act(up) keeps two more intermediate-wide tensors than fc → act
    gptq: dict | None = None  # the checkpoint's quantization_config when it is GPTQ
    remote_loss: bool = False  # the checkpoint's own code shifts logits with a copy before the loss
    embedding_names: tuple[str, ...] = ("embed_tokens",)
    output_name: str = "lm_head"
    checkpoint_bytes: int = 2  # bytes per weight in the checkpoint's files (config.json torch_dtype/dtype)
    fused_experts: tuple[tuple[int, int, int], ...] = ()  # every 3-D [experts, out, in] parameter of an MoE
    experts_per_token: int = 0  # routed experts each token goes through (an MoE's top-k)

    @property
    def fused_expert_params(self) -> int:
        return sum(e * o * i for e, o, i in self.fused_experts)

    @property
    def expert_width(self) -> int:
        """One routed expert's intermediate width: the narrowest non-hidden side of its stacks (the down
        projection's input; the fused gate/up stack is twice as wide), whichever way the stacks are laid out."""
        return min(o if i == self.hidden else i for _, o, i in self.fused_experts)

    @property
    def block_weights(self) -> int:
        return sum(lin.n_in * lin.n_out for lin in self.block)

    @property
    def quantizable(self) -> int:
        """Weights of the block projections: what NF4 / GPTQ quantize (lm_head and embeddings stay)."""
        return self.layers * self.block_weights

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden


def _gptq(config: dict) -> dict | None:
    qc = config.get("quantization_config") or {}
    if str(qc.get("quant_method", "")).lower() != "gptq":
        return None
    return {"bits": int(qc.get("bits", 4)), "group_size": int(qc.get("group_size", 128)),
            "desc_act": bool(qc.get("desc_act", False))}


def _first(config: dict, *keys, default=None):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is None:
        raise UsageError(f"config.json has none of {', '.join(keys)}: cannot plan this architecture.")
    return default


def qwen1_shape(config: dict) -> Shape:
    """Qwen(1) from its keys: c_attn (fused qkv, with bias), attn c_proj, w1 / w2 (the two MLP halves,
    `ffn_hidden_size` is their summed width) and mlp c_proj; RMSNorm ln_1, ln_2, ln_f; untied wte / lm_head."""
    h = int(_first(config, "n_embd", "hidden_size"))
    layers = int(_first(config, "n_layer", "num_hidden_layers"))
    heads = int(_first(config, "n_head", "num_attention_heads"))
    half = int(_first(config, "ffn_hidden_size", "intermediate_size")) // 2
    vocab = int(_first(config, "padded_vocab_size", "vocab_size"))
    kv_channels = int(config.get("kv_channels") or h // heads)
    proj = heads * kv_channels
    block = (Linear("c_attn", h, 3 * proj, bias=True), Linear("c_proj", proj, h),
             Linear("w1", h, half), Linear("w2", h, half), Linear("c_proj", half, h))
    block_params = sum(lin.n_in * lin.n_out + (lin.n_out if lin.bias else 0) for lin in block) + 2 * h
    total = layers * block_params + h + 2 * vocab * h
    return Shape("qwen", h, layers, heads, heads, kv_channels, half, vocab, False, block, total,
                 gptq=_gptq(config), remote_loss=True, embedding_names=("wte",))


def _block_from_meta(model) -> tuple[tuple[Linear, ...], int]:
    import torch

    output = model.get_output_embeddings()
    blocks: dict[str, list[Linear]] = {}
    for name, module in model.named_modules():
        match = re.search(r"^(.*\.)(\d+)\.(.+)$", name)
        if not isinstance(module, torch.nn.Linear) or module is output or not match:
            continue
        key = match.group(1) + match.group(2)
        blocks.setdefault(key, []).append(Linear(name.rsplit(".", 1)[-1], module.in_features, module.out_features,
                                                 module.bias is not None))
    if not blocks:
        raise UsageError("found no linear projections inside decoder blocks: cannot plan this architecture.")
    shapes = list(blocks.values())
    if any(s != shapes[0] for s in shapes):  # e.g. alternating dense / MoE blocks
        raise UsageError("decoder blocks differ in shape: qlaunch.plan models identical blocks only.")
    return tuple(shapes[0]), len(shapes)


def transformers_shape(config: dict) -> Shape:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from qlaunch.config.skeleton import meta_skeleton

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise UsageError(f"config.json model_type {model_type!r} is not an architecture transformers knows (and not "
                         "qwen): qlaunch.plan cannot describe it without running its code.")
    values = {k: v for k, v in config.items() if k not in ("quantization_config", "model_type", "auto_map")}
    hf_config = AutoConfig.for_model(model_type, **values)
    model = meta_skeleton(hf_config)
    block, layers = _block_from_meta(model)
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    h = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or h // heads)
    names = {lin.name for lin in block}
    intermediate = int(getattr(text, "intermediate_size", None) or 4 * h)
    return Shape(
        model_type=model_type, hidden=h, layers=layers, heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads), head_dim=head_dim,
        intermediate=intermediate, vocab=int(text.vocab_size),
        tied=bool(getattr(hf_config, "tie_word_embeddings", False)), block=block,
        total_params=sum(p.numel() for p in model.parameters()),
        gated_mlp=bool(names & {"gate_proj", "w1", "w3", "gate_up_proj"}), gptq=_gptq(config),
        fused_experts=tuple(tuple(p.shape) for p in model.parameters() if is_fused_experts(p)),
        experts_per_token=experts_per_token(config),
    )


STORED_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def model_shape(config: dict) -> Shape:
    shape = qwen1_shape(config) if config.get("model_type") == "qwen" else transformers_shape(config)
    stored = STORED_BYTES.get(str(config.get("torch_dtype") or config.get("dtype") or "").replace("torch.", ""), 2)
    return dataclasses.replace(shape, checkpoint_bytes=stored)
