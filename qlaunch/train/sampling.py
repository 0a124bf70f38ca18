"""--group_by_length with the lengths the dataset already has.

transformers' Trainer finds lengths for LengthGroupedSampler only in a `datasets.Dataset` length column;
for any other dataset the sampler reads every sample to measure it — on every rank, in every run: a
million cached conversations converted row by row from Arrow before the first step. qlaunch's datasets
know their lengths (data.dataset.TokenizedDataset.lengths: one Arrow column read when cached), so the
sampler gets them. The order itself is transformers' (random megabatches sorted by length, reshuffled
each epoch from the seeded generator), so it is not stored: it takes about a second per million samples
(bench/million.py). Other strategies (`batch_rebalance`) are left to transformers.
"""
from __future__ import annotations


class KnownLengthsMixin:
    """Trainer mixin: LengthGroupedSampler built from train_dataset.lengths when the dataset has them."""

    def _get_train_sampler(self, train_dataset=None):
        from transformers.trainer_pt_utils import LengthGroupedSampler

        dataset = self.train_dataset if train_dataset is None else train_dataset
        # the strategy first: `lengths` reads a column (or every in-memory sample) that other orders never need
        if self.args.train_sampling_strategy != "group_by_length" or not hasattr(dataset, "lengths"):
            return super()._get_train_sampler(train_dataset)
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    dataset=dataset, lengths=dataset.lengths)
