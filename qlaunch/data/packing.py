"""Packing: tokenized samples placed into rows of up to model_max_length tokens, isolated.

Rows are filled first-fit-decreasing (longest samples first, each into the first row with room),
which leaves little padding and is deterministic, in O(n log n) (first_fit_decreasing); the plan is kept
in the tokenized-data cache (packing_plan). Each sample keeps its own positions: position_ids
restart at 0 at every sample and no 2D attention mask is passed, so transformers 5 derives a
block-diagonal causal mask from the restarts (masking_utils.find_packed_sequence_indices, used only
when attention_mask is None; sdpa and eager) and flash-attention uses them as varlen boundaries in a
batch of one row (the collator concatenates the rows for it: collate.flattens_packed_rows) — no
token attends across samples. The first label of every sample is -100, so no position predicts
the next sample's first token: each sample's loss terms are exactly those it has alone.
"""
from __future__ import annotations

import json
import logging
import os

from torch.utils.data import Dataset

from qlaunch.data.labels import IGNORE_INDEX

log = logging.getLogger("qlaunch")


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices grouped into rows whose lengths sum to at most capacity: longest first, each into the
    lowest-numbered row with room (a new row when none has it).

    The lowest row with room is found in a max-tree over the rows' free room (leftmost leaf >= the length),
    O(log n) per sample instead of scanning every row: 1M samples no longer take most of an hour on every
    rank. The rows are exactly those of the scan."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    free = [-1] * (2 * size)  # free[leaf] = a row's room (-1: no row yet); inner nodes: the max below
    rows: list[list[int]] = []
    for i in order:
        need = lengths[i]
        if free[1] >= need:
            node = 1
            while node < size:  # the leftmost child whose subtree has room
                node = 2 * node if free[2 * node] >= need else 2 * node + 1
            rows[node - size].append(i)
            room = free[node] - need
        else:
            node = size + len(rows)
            rows.append([i])
            room = capacity - need
        free[node] = room
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


def packing_plan(lengths: list[int], capacity: int, plan_dir: str | None = None) -> list[list[int]]:
    """first_fit_decreasing's rows, stored beside the tokenized data they index (plan_dir: the cache entry,
    whose key already fixes the samples and --model_max_length): the process that runs first computes
    and writes them, every later process and run reads them (a plan that does not describe these samples
    is computed again)."""
    path = os.path.join(plan_dir, f"packing-{capacity}.json") if plan_dir else None
    if path and os.path.isfile(path):
        try:
            with open(path) as f:
                plan = json.load(f)
            rows = plan["rows"]
            if plan.get("capacity") == capacity and plan.get("samples") == len(lengths) and \
                    sum(len(r) for r in rows) == len(lengths):
                return rows
        except (OSError, ValueError, KeyError, TypeError):
            pass
        log.warning("Packing plan %s does not describe these samples: computing it again.", path)
    rows = first_fit_decreasing(lengths, capacity)
    if path:
        try:  # atomic: a reader sees the old plan or the whole new one
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({"capacity": capacity, "samples": len(lengths), "rows": rows}, f, separators=(",", ":"))
            os.replace(tmp, path)
        except OSError:  # a read-only cache: every run plans again, as without one
            pass
    return rows


class PackedDataset(Dataset):
    """Rows of several samples: input_ids, labels and position_ids, concatenated. plan_dir: where the
    packing plan is kept (the samples' cache entry; None: planned here)."""

    def __init__(self, samples: Dataset, max_length: int, plan_dir: str | None = None):
        self.samples = samples
        # A cached dataset reads its lengths from Arrow; reading every row would convert each one.
        lengths = samples.lengths if hasattr(samples, "lengths") else [len(samples[i]["input_ids"])
                                                                         for i in range(len(samples))]
        self.rows = packing_plan(lengths, max_length, plan_dir)
        self.stats = getattr(samples, "stats", None)
        tokens = sum(lengths)
        self.fill = tokens / (len(self.rows) * max_length) if self.rows else 0.0
        log.info("Packing: %d samples → %d rows of up to %d tokens (%.1f%% of the row capacity used; "
                 "samples are isolated: positions restart, no attention across them).",
                 len(lengths), len(self.rows), max_length, 100 * self.fill)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        input_ids, labels, position_ids = [], [], []
        for index in self.rows[i]:
            item = self.samples[index]
            input_ids += item["input_ids"]
            labels += [IGNORE_INDEX] + list(item["labels"][1:])  # never predict across a boundary
            position_ids += range(len(item["input_ids"]))
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def pack(dataset, max_length: int):
    """The PackedDataset of a dataset (None stays None), its plan kept in the dataset's cache entry if any."""
    return None if dataset is None else PackedDataset(dataset, max_length, getattr(dataset, "cache_entry", None))
