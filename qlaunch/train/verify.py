"""Read the final adapter back and check it is the model that was trained.

After the final save: every tensor of the in-memory adapter is in the file with its shape and
values, the file has nothing else, and probe logits with the file's tensors loaded equal the
in-memory model's. A truncated file, a missing or zeroed tensor, or names that do not map onto
the model fail the run (exit code 1) instead of surfacing at serving time.
"""
from __future__ import annotations

import contextlib
import os

import torch

ADAPTER_FILE = "adapter_model.safetensors"


def _probe_logits(model, input_ids) -> torch.Tensor:
    # In training mode: an eval-mode no-grad forward repacks 4-bit weights into an inference layout
    # (bitsandbytes on CPU, gptqmodel's TorchAtenLinear) and would change the model it verifies.
    # Dropout is made repeatable by a fixed seed inside a forked RNG (the run's RNG is untouched).
    was_training = model.training
    model.train()
    devices = [input_ids.device] if input_ids.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(0)
        logits = model(input_ids=input_ids).logits.float()
    model.train(was_training)
    return logits


@contextlib.contextmanager
def full_trainable_parameters(model, partitioned: bool):
    """Under ZeRO-3 each rank holds shards (empty placeholders); gather the trainable parameters
    (the adapter: small) for the check. Collective: every rank must enter."""
    if not partitioned:
        yield
        return
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def verify_saved_adapter(model, output_dir: str, *, compare_logits: bool = True, expected: dict | None = None,
                         compute_dtype: torch.dtype = torch.float32) -> list[str]:
    """Problems with output_dir/adapter_model.safetensors as a copy of `model`'s adapter ([] if none).

    compare_logits False: under ZeRO-3 and FSDP2 a forward pass is collective and the frozen base is
    sharded too, so only names, shapes and values are checked (inside full_trainable_parameters, or
    against `expected`: the adapter's tensors gathered beforehand, qlaunch.train.fsdp). compute_dtype: the
    run's, for the GPU tolerance of the probe logits (logits_mismatch)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = os.path.join(output_dir, ADAPTER_FILE)
    if not os.path.isfile(path):
        return [f"{path} is missing."]
    try:
        saved = load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        return [f"{path} cannot be read back ({type(e).__name__}: {e}); the file is truncated or corrupt."]
    if expected is None:
        expected = get_peft_model_state_dict(model)
    if not expected and any(p.requires_grad for p in model.parameters()):
        # peft finds the adapter by module names; a wrapper that renames them (FSDP's checkpoint
        # wrapper) makes it find nothing, and an empty file would then "match" an empty expectation.
        return [f"peft finds no adapter tensors in the trained model, though it has trainable parameters: "
                f"{path} would hold no weights."]
    problems = []
    missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing:
        problems.append(f"{len(missing)} adapter tensors missing from {path}, e.g. {missing[0]}.")
    if extra:
        problems.append(f"{len(extra)} unexpected tensors in {path}, e.g. {extra[0]}.")
    for name in sorted(set(expected) & set(saved)):
        want = expected[name]
        if tuple(saved[name].shape) != tuple(want.shape):
            problems.append(f"{name}: saved shape {tuple(saved[name].shape)} != trained {tuple(want.shape)}.")
        elif not torch.equal(saved[name].to(want.dtype), want.detach().cpu()):
            diff = (saved[name].float() - want.detach().cpu().float()).abs().max().item()
            problems.append(f"{name}: saved values differ from the trained ones (max |diff| {diff:.3g}).")
    if problems or not compare_logits:
        return problems
    vocab = model.get_input_embeddings().num_embeddings
    device = next(p.device for p in model.parameters())
    probe = (torch.arange(16, device=device) * 7919 % vocab).unsqueeze(0)
    before = _probe_logits(model, probe)
    result = set_peft_model_state_dict(model, {k: v.to(device) for k, v in saved.items()})
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k or "modules_to_save" in k]
    if unexpected:
        return [f"{len(unexpected)} tensors of {path} do not map onto the model, e.g. {unexpected[0]}."]
    after = _probe_logits(model, probe)
    problem = logits_mismatch(before, after, exact=device.type == "cpu", compute_dtype=compute_dtype)
    return [problem] if problem else []


def logits_mismatch(before: torch.Tensor, after: torch.Tensor, *, exact: bool, compute_dtype: torch.dtype
                    ) -> str | None:
    """Whether two probe forwards of the same weights disagree (a pure decision: tested with GPU facts).

    On a CPU the two forwards are bit-equal. On a GPU cuBLAS does not promise bitwise-equal results across
    allocations (another workspace, another algorithm), so a few units in the last place of the compute
    dtype at the logits' scale are allowed; the adapter's tensors themselves were compared bit-exactly
    before this, so a loose bound here cannot let a wrong file through."""
    diff = (before - after).abs().max().item()
    if exact:
        bound = 0.0
    else:
        scale = max(before.abs().max().item(), 1e-6)
        bound = 4 * torch.finfo(compute_dtype).eps * scale
    if diff > bound or diff != diff:
        return (f"probe logits with the saved adapter differ from the trained model's (max |diff| {diff:.3g}"
                + (f", allowed {bound:.3g} for {str(compute_dtype).replace('torch.', '')} on this device" if bound
                   else "") + ").")
    return None
