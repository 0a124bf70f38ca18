"""Loss only where there are labels: positions labelled -100 never reach lm_head or the softmax.

With assistant-only labels about half the positions of a chat batch carry no label, yet the
ordinary causal-LM path projects every position onto the vocabulary and upcasts those logits to
fp32 (for a 128k vocabulary at 4 x 2048 tokens that is ~4 GB). transformers 5 already provides the
mechanism: `logits_to_keep` accepts a boolean (batch, sequence) mask and the CausalLM heads then
run lm_head on the kept hidden states only, flattened to (N, hidden); `ForCausalLMLoss` accepts
`shift_labels` already aligned with them. So the Trainer mixin below only builds the mask from the
shifted labels and passes both through the model's own forward — inside DDP's and DeepSpeed's
forward, so gradient sync and ZeRO-3 gathering work unchanged.

The loss is the same sum of per-token cross-entropies divided by the same `num_items_in_batch`
(the Trainer counts it from `labels[..., 1:]` before this runs), so gradient accumulation and
token averaging across ranks are untouched; only the order of float summation can differ.
"""
from __future__ import annotations

import inspect
import sys

import torch
import torch.nn.functional as F

from qlaunch.data.labels import IGNORE_INDEX


def labelled_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, targets): positions whose next token is labelled, and those labels flattened.

    Position i predicts label i+1 (the causal shift ForCausalLMLoss applies); the last position
    predicts nothing."""
    shifted = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    mask = shifted != IGNORE_INDEX
    return mask, shifted[mask]


# Model types whose classes tests/unit/train/test_loss.py proves equal to the full-logits path (loss and
# every LoRA gradient, padded and packed). A class can pass the structural checks below and still
# post-process 3-D logits (soft-capping, scaling) or compute a loss of its own: only listed types run it.
LABELLED_LOGITS_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral"})


def labelled_logits_unsupported(model, args=None) -> str | None:
    """Why `model` (trained with `args`) cannot take a boolean logits_to_keep mask (None when it can).

    Decided from the model class itself: its forward takes `logits_to_keep`, its module slices
    with transformers' `slice_logits_to_keep` (which understands masks), its loss is transformers'
    ForCausalLMLoss (which takes `shift_labels`) and its model type is one the tests check. Remote-code
    models such as Qwen(1) have none of these and keep the ordinary path; so do runs whose loss or graph
    another tool owns (--use_liger_kernel replaces the loss, --torch_compile would recompile for every
    new count of labelled positions)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cls = type(base)
    if "logits_to_keep" not in inspect.signature(cls.forward).parameters:
        return f"{cls.__name__}.forward takes no logits_to_keep"
    if getattr(sys.modules.get(cls.__module__), "slice_logits_to_keep", None) is None:
        return f"{cls.__name__} does not slice with transformers' slice_logits_to_keep"
    if getattr(base, "loss_function", None) is not ForCausalLMLoss:
        return f"{cls.__name__}'s loss is not transformers' ForCausalLMLoss"
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if model_type not in LABELLED_LOGITS_MODEL_TYPES:
        checked = ", ".join(sorted(LABELLED_LOGITS_MODEL_TYPES))
        return f"model type {model_type!r} is not one qlaunch's tests check ({checked})"
    if getattr(args, "use_liger_kernel", False):
        return "--use_liger_kernel replaces the loss"
    if getattr(args, "torch_compile", False):
        return "--torch_compile would recompile for every new count of labelled positions"
    return None


class LabelledLogitsMixin:
    """Trainer mixin: compute logits and loss only at labelled positions (see the module docstring).

    labelled_logits_only is set by build_trainer; off, the ordinary full-logits path runs."""

    labelled_logits_only = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        # Evaluation with compute_metrics hands the logits to user code (and gathers them across
        # ranks), which expects (batch, sequence, vocab): keep the ordinary path there.
        metrics_need_logits = return_outputs and self.compute_metrics is not None
        if (self.labelled_logits_only and labels is not None and "logits_to_keep" not in inputs
                and not metrics_need_logits and self.label_smoother is None and self.compute_loss_func is None):
            mask, targets = labelled_positions(labels)
            inputs = {**inputs, "logits_to_keep": mask, "shift_labels": targets}
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
