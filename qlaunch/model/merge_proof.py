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


def batch_logits(model, batch, device) -> list[torch.Tensor]:
    """Each probe's float32 logits at its own positions."""
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
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


class Files:
    """Tensors read from a checkpoint's files by the names the model (possibly peft-wrapped) gives them,
    upcast to float32 on the device: tied weights read from their source, peft's wrapper names unwrapped."""

    def __init__(self, reader, model, device):
        self.reader, self.device = reader, device
        self.tied = {n: source for n, source in tied_names(model).items() if n not in reader.location}

    def __contains__(self, name: str) -> bool:
        return self.name(name) in self.reader.location

    def name(self, name: str) -> str:
        for wrapper in (".base_layer", ".modules_to_save.default", ".original_module"):
            name = name.replace(wrapper, "")
        return self.tied.get(name, name)

    def __call__(self, name: str) -> torch.Tensor:
        return self.reader.read(self.name(name)).to(self.device).float()


def owning_params(base, skip=()) -> dict[str, torch.nn.Module]:
    """Modules holding parameters of their own, outside `skip` (replaced modules, with their children)."""
    return {n: m for n, m in base.named_modules() if n not in skip and not any(n.startswith(p + ".") for p in skip)
            and any(True for _ in m.parameters(recurse=False))}


def meta_from(base, files: Files | None, skip=()):
    """On a skeleton whose base weights are on the meta device, each module reads its own from the base's
    files while it runs (a no-op for a loaded model)."""
    if files is None:
        return ExitStack()
    meta = {n: m for n, m in owning_params(base, skip).items() if any(p.is_meta for p in m.parameters(recurse=False))}
    return parameters_from(meta, files)


def exact_pass(model, batch, device, base_files: Files | None = None) -> list[torch.Tensor]:
    """The reference: quantized layers in float32 on their dequantized weights, the adapter unmerged."""
    quantized = {m: linear_with(lambda m=m: (dequantized_weight(m), None if m.bias is None else m.bias.float()))
                 for m in model.get_base_model().modules() if is_quantized(m)}
    with forwards(quantized), meta_from(model.get_base_model(), base_files):
        return batch_logits(model, batch, device)


def merged_pass(model, batch, device, merge, saved, base_files: Files | None = None):
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
    base = model.get_base_model()
    replaced = {n: m for n, m in layers(base).items() if n in computed}
    with forwards({m: linear_with(lambda n=n: weights(n)) for n, m in replaced.items()}), \
            meta_from(base, base_files, skip=replaced):
        return batch_logits(model, batch, device), mismatched


def saved_pass(model, batch, device, saved) -> list[torch.Tensor]:
    """The saved files' weights (upcast to float32) in place of the model's own, module by module."""
    base = model.get_base_model()
    linear = layers(base)
    files = Files(saved, base, device)
    replaced = {m: linear_with(lambda n=n: (files(n + ".weight"), files(n + ".bias") if n + ".bias" in files
                                            else None))
                for n, m in linear.items()}
    with forwards(replaced), parameters_from(owning_params(base, skip=linear), files):
        return batch_logits(model, batch, device)


def tied_names(model) -> dict[str, str]:
    """Tied weights (e.g. lm_head.weight -> model.embed_tokens.weight): a checkpoint stores only the source."""
    tied = getattr(model, "_tied_weights_keys", None)
    return dict(tied) if isinstance(tied, dict) else {}
