"""Dynamic padding: each batch is padded to its own longest sample, never to model_max_length.

Written by hand rather than through `tokenizer.pad` so that it works for any tokenizer,
including remote-code ones (Qwen-7B's tiktoken tokenizer) whose padding support is partial.
Padding goes on the right; padded positions get attention 0 and label -100.
"""
from __future__ import annotations

import torch

from qlaunch.data.tokenize import IGNORE_INDEX


class PaddingCollator:
    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
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
            return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
