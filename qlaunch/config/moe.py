"""Mixture-of-experts bases: what transformers builds for their experts, known before anything loads.

transformers 5 holds the experts of many MoE classes (Qwen2-MoE, Qwen3-MoE, Mixtral, DeepSeek-style) as fused
3-D parameters, [experts, out, in], not as nn.Linear modules. bitsandbytes quantizes nn.Linear only, so under
NF4/FP4 those experts — most of an MoE model — would stay in 16 bits; qlaunch.model.experts_4bit quantizes
them. LoRA reaches them through peft's `target_parameters` (--lora_target_parameters).
The experts are counted on the model's skeleton built on the meta device (no memory, no weights read).
"""
from __future__ import annotations

from dataclasses import dataclass

from qlaunch.config.skeleton import meta_skeleton

# config keys transformers' MoE classes use for the number of routed experts per layer
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
PER_TOKEN_KEYS = ("num_experts_per_tok", "moe_topk", "num_experts_per_token")


@dataclass(frozen=True)
class Experts:
    model_type: str
    experts: int  # routed experts per MoE layer
    per_token: int  # experts each token is routed to
    fused_tensors: int  # 3-D expert parameters ([experts, out, in]) that are not nn.Linear
    fused_params: int
    total_params: int
    names: tuple[str, ...]  # the fused parameters' names inside a block, e.g. mlp.experts.gate_up_proj

    @property
    def active_params(self) -> int:
        """Parameters a token uses: everything but the experts it is not routed to."""
        unused = self.fused_params * (1 - self.per_token / self.experts) if self.experts else 0
        return int(self.total_params - unused)

    def text(self) -> str:
        return (f"MoE base ({self.model_type}): {self.experts} experts per layer, {self.per_token} per token; "
                f"{amount(self.total_params)} parameters, {amount(self.active_params)} active per token")


def amount(n: float, unit: str = "") -> str:
    """1.23B / 45.6M / 789k (+ unit): parameter counts and bytes of any model size."""
    for scale, suffix in ((1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}{unit}"
    return f"{n:.0f}{' ' + unit if unit else ''}"


def is_fused_experts(param) -> bool:
    """The one rule for which parameters are fused experts: the 3-D ones, [experts, out, in] (no other kind of
    parameter in transformers' causal LMs has three dimensions). What is counted here, planned
    (qlaunch.memory.shape) and packed to 4 bits (qlaunch.model.experts_4bit) is decided by it alone."""
    return param.dim() == 3


def experts_per_token(config: dict) -> int:
    """Routed experts each token goes through, under whichever key the config names it; 0 if none."""
    return next((int(config[k]) for k in PER_TOKEN_KEYS if config.get(k)), 0)


def is_moe(config: dict) -> bool:
    return any(int(config.get(k) or 0) > 1 for k in EXPERT_KEYS)


def count_experts(config: dict, model) -> Experts:
    """The experts of a model skeleton: its 3-D parameters are the fused experts."""
    fused = [(name, p.numel()) for name, p in model.named_parameters() if is_fused_experts(p)]
    experts = next((int(config[k]) for k in EXPERT_KEYS if config.get(k)), 0)
    per_token = experts_per_token(config) or experts
    inner = sorted({".".join(n.split(".")[3:]) if n.split(".")[1:2] == ["layers"] else n for n, _ in fused})
    return Experts(str(config.get("model_type")), experts, per_token, len(fused), sum(n for _, n in fused),
                   sum(p.numel() for p in model.parameters()), tuple(inner))


def experts_of(model_dir: str, config: dict, trust_remote_code: bool = False) -> Experts | None:
    """The base's experts, or None when its config is not a mixture of experts."""
    if not is_moe(config):
        return None
    return count_experts(config, meta_skeleton(model_dir, trust_remote_code=trust_remote_code))


def experts_4bit_note(experts: Experts, quant_method: str) -> str:
    """What happens to fused experts under NF4/FP4: bitsandbytes leaves them 16-bit, qlaunch quantizes them."""
    return (f"{experts.fused_tensors} fused 3-D expert parameters ({amount(experts.fused_params)}, "
            f"{experts.fused_params / max(experts.total_params, 1):.0%} of the model) are not nn.Linear, so "
            f"bitsandbytes leaves them 16-bit: qlaunch quantizes them to {quant_method} per expert after loading "
            "(qlaunch.model.experts_4bit) and runs the experts' eager forward.")


def targets(name: str, wanted: list[str]) -> bool:
    """Whether --lora_target_parameters names this parameter, as peft matches it: the name, or a suffix after a dot."""
    return any(name == w or name.endswith("." + w) for w in wanted)


def unknown_target_parameters(wanted: list[str] | None, model) -> list[str]:
    """Entries of --lora_target_parameters that end no parameter name of the model (peft's matching)."""
    if not wanted:
        return []
    names = [n for n, _ in model.named_parameters()]
    return [w for w in wanted if not any(targets(n, [w]) for n in names)]


def targeted_parameter_shapes(wanted: list[str] | None, model) -> tuple[tuple[int, ...], ...]:
    """The shapes of every parameter --lora_target_parameters adapts (`targets`), one entry per parameter —
    each layer's experts once each."""
    if not wanted:
        return ()
    return tuple(tuple(p.shape) for n, p in model.named_parameters() if targets(n, wanted))
