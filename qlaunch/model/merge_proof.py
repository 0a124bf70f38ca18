"""Probe logits of a merge, computed module by module on the adapter model as it loads for inference.

The adapter model (the 4-bit base + the adapter, qlaunch.model.inference) is the only model held: its
4-bit weights are what training held. Each pass below swaps what its linear layers compute with, one module
at a time during one batched forward of the probes, so no pass needs the whole float32 model:

- exact:  every quantized layer computes in float32 with its dequantized weight, the adapter unmerged
          (peft's own forward) — the reference of the proof;
- merged: every merged or dequantized layer computes with the streaming merge's float32 result for it, and
          the saved tensor is checked to be that result in the output dtype, bit for bit;
- saved:  every layer and every other weight is read from the saved files (what a server will load);
- kernel: nothing swapped — the base's own 4-bit kernels, as the adapter trained (information only).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F

from qlaunch.model.inference import dequantized_weight


def probe_batch(tokenizer, conversations, max_tokens: int = 128) -> dict[str, torch.Tensor]:
    """The probes as one right-padded batch (one forward per pass reads each weight once)."""
    rows = []
    for messages in conversations:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        rows.append(tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens])
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def batch_logits(model, batch) -> list[torch.Tensor]:
    """Each probe's float32 logits at its own positions."""
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits.float().cpu()
    return [logits[i, :int(n)] for i, n in enumerate(batch["attention_mask"].sum(-1))]


def is_quantized(module) -> bool:
    """A 4-bit layer itself (not a peft wrapper, which exposes its base layer's weight too)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(module, BaseTunerLayer):
        return False
    return type(getattr(module, "weight", None)).__name__ == "Params4bit" or hasattr(module, "qweight")


def layers(base_model) -> dict[str, torch.nn.Module]:
    """The model's linear layers by module name: LoRA-wrapped ones as their wrapper, not their parts."""
    from peft.tuners.lora import LoraLayer

    found, inside = {}, ()
    for name, module in base_model.named_modules():
        if inside and name.startswith(inside):
            continue
        if isinstance(module, LoraLayer) or is_quantized(module) or isinstance(module, torch.nn.Linear):
            found[name] = module
            inside = (name + ".",)
    return found


def linear_with(weights):
    """A forward computing x @ W.T + b in float32 with weights() = (W, b), fetched at call time."""
    def forward(x, *args, **kwargs):
        weight, bias = weights()
        return F.linear(x.float(), weight, bias)
    return forward


@contextmanager
def forwards(replacements: dict[torch.nn.Module, object]):
    """Modules compute with the given forwards inside the block (the instance attribute shadows the class's)."""
    for module, forward in replacements.items():
        module.forward = forward
    try:
        yield
    finally:
        for module in replacements:
            del module.forward


@contextmanager
def parameters_from(modules: dict[str, torch.nn.Module], read):
    """Each module's own parameters replaced by read(full name) (float32) while it runs, restored after."""
    def pre(module, _):
        module._held = dict(module._parameters)
        for leaf, value in module._held.items():
            if value is not None:
                module._parameters[leaf] = torch.nn.Parameter(read(f"{module._probe_name}.{leaf}"),
                                                              requires_grad=False)

    def post(module, _, output):
        module._parameters.update(module.__dict__.pop("_held"))

    with ExitStack() as stack:
        for name, module in modules.items():
            module._probe_name = name
            stack.callback(module.register_forward_pre_hook(pre).remove)
            stack.callback(module.register_forward_hook(post).remove)
        yield


def exact_pass(model, batch) -> list[torch.Tensor]:
    """The reference: quantized layers in float32 on their dequantized weights, the adapter unmerged."""
    quantized = {m: linear_with(lambda m=m: (dequantized_weight(m), None if m.bias is None else m.bias.float()))
                 for m in model.get_base_model().modules() if is_quantized(m)}
    with forwards(quantized):
        return batch_logits(model, batch)


def merged_pass(model, batch, merge, saved) -> tuple[list[torch.Tensor], list[str]]:
    """The streaming merge's float32 results in place of every merged or dequantized layer; returns the
    logits and the saved tensors that are not those results in the output dtype."""
    mismatched = []

    def weights(name):
        tensors = merge.module_tensors(name)
        for leaf, value in tensors.items():
            stored = saved.read(f"{name}.{leaf}")
            if stored.dtype != merge.dtype or not torch.equal(stored, value.to(merge.dtype).cpu()):
                mismatched.append(f"{name}.{leaf}")
        return tensors["weight"], tensors.get("bias")

    computed = merge.merged_modules()
    replaced = {m: linear_with(lambda n=n: weights(n)) for n, m in layers(model.get_base_model()).items()
                if n in computed}
    with forwards(replaced):
        return batch_logits(model, batch), mismatched


def saved_pass(model, batch, saved) -> list[torch.Tensor]:
    """The saved files' weights (upcast to float32) in place of the model's own, module by module."""
    base = model.get_base_model()
    linear = layers(base)
    others = {n: m for n, m in base.named_modules() if n not in linear and not any(
        n.startswith(p + ".") for p in linear) and any(True for _ in m.parameters(recurse=False))}
    tied = {n: source for n, source in tied_names(base).items() if n not in saved.location}

    def read(name):
        name = name.replace(".modules_to_save.default", "").replace(".original_module", "")
        return saved.read(tied.get(name, name)).float()

    def read_param(name):  # hooks run where the model is
        return read(name).to(model.device)

    def read_on(name, module):
        return read(name).to(next(module.parameters()).device)

    replaced = {m: linear_with(lambda n=n, m=m: (read_on(n + ".weight", m),
                                                 read_on(n + ".bias", m) if n + ".bias" in saved.location else None))
                for n, m in linear.items()}
    with forwards(replaced), parameters_from(others, read_param):
        return batch_logits(model, batch)


def tied_names(model) -> dict[str, str]:
    """Tied weights (e.g. lm_head.weight -> model.embed_tokens.weight): a checkpoint stores only the source."""
    tied = getattr(model, "_tied_weights_keys", None)
    return dict(tied) if isinstance(tied, dict) else {}
