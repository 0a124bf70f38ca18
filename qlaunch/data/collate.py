"""Dynamic padding: each batch is padded to its own longest sample, never to model_max_length.

Written by hand rather than through `tokenizer.pad` so that it works for any tokenizer,
including remote-code ones (Qwen-7B's tiktoken tokenizer) whose padding support is partial.
Padding goes on the right; padded positions get attention 0 and label -100. Packed rows (position
ids restarting per sample) carry no attention mask; for flash-attention they are concatenated into
one row (flattens_packed_rows), with the sample boundaries as flash-attention's varlen arguments
(varlen_kwargs).
"""
from __future__ import annotations

import torch

from qlaunch.data.labels import IGNORE_INDEX


def flattens_packed_rows(attn_implementation: str | None) -> bool:
    """Whether packed rows must be concatenated into one row for this attention implementation.

    transformers' flash-attention path (modeling_flash_attention_utils._is_packed_sequence) reads
    sample boundaries from position ids only in a batch of one row; with several rows it runs plain
    causal flash attention over each whole row, so packed samples would attend to each other.
    sdpa and eager build per-sample masks from the position ids of every row (masking_utils)."""
    if not attn_implementation:
        return False
    from transformers.utils.generic import is_flash_attention_requested

    return bool(is_flash_attention_requested(requested_attention_implementation=attn_implementation))


def compile_padding(torch_compile: bool, packing: bool, model_max_length: int) -> int | None:
    """The collator's pad_to_multiple_of for a --torch_compile run; None: the usual padding.

    torch.compile guards on input shapes: a batch of a new shape recompiles (automatic dynamic shapes
    make the changed dimension symbolic, so each dimension does this once). Packed rows are nearly full,
    so padding every packed batch to model_max_length costs almost nothing (1.2% padding instead of 0.4%
    in bench/throughput.py) and leaves one sequence length: the first, static graph serves every full
    batch, and only an epoch's smaller last batch recompiles (its row count). A row flattened for flash
    attention is padded to a multiple of model_max_length. Unpacked batches are left to dynamic
    padding: their lengths span the whole range, so buckets would add padding on every step and still
    recompile at least once (one recompile makes the sequence length dynamic, the graph then fits
    every length)."""
    return model_max_length if torch_compile and packing else None


def varlen_kwargs(position_ids: torch.Tensor) -> dict:
    """cu_seq_lens_q/_k (int32 [0, l1, l1+l2, ..., total]) and max_length_q/_k (ints) of one flattened
    row: each run of positions restarting at 0 is one sequence (every sample, and the padding after them).

    Without them transformers' flash-attention path re-derives these from position_ids in every layer
    (_is_packed_sequence, prepare_fa_kwargs_from_position_ids), with device syncs; here they come from the
    small CPU tensor once per batch, and the model passes them through to each layer's attention."""
    starts = (position_ids == 0).nonzero().flatten().tolist()
    cu_seq_lens = torch.tensor(starts + [len(position_ids)], dtype=torch.int32)
    longest = int(cu_seq_lens.diff().max())
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": longest, "max_length_k": longest}


class PaddingCollator:
    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, flatten_packed: bool = False):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.flatten_packed = flatten_packed

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor | int]:
        if self.flatten_packed and "position_ids" in items[0]:
            items = [{key: [v for item in items for v in item[key]] for key in ("input_ids", "labels", "position_ids")}]
        length = max(len(item["input_ids"]) for item in items)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        packed = "position_ids" in items[0]
        # Packed rows: the padding is one more "sample" of restarting positions, and there is no
        # attention mask (its absence is what makes transformers build per-sample masks).
        position_ids = torch.arange(length).repeat(len(items), 1) if packed else None
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.tensor(item["input_ids"])
            labels[row, :n] = torch.tensor(item["labels"])
            attention_mask[row, :n] = 1
            if packed:
                position_ids[row, :n] = torch.tensor(item["position_ids"])
                position_ids[row, n:] = torch.arange(length - n)
        if packed:
            batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
            return {**batch, **varlen_kwargs(position_ids[0])} if self.flatten_packed else batch
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
