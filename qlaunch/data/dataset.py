"""Training / evaluation datasets: eager (tokenized once, with statistics) or lazy."""
from __future__ import annotations

import logging

from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from qlaunch.data.formats import load_samples
from qlaunch.data.tokenize import TokenizeStats, tokenize_messages
from qlaunch.errors import UsageError

log = logging.getLogger("qlaunch")


class TokenizedDataset(Dataset):
    """All samples tokenized up front, so truncation/drop counts are known before training."""

    def __init__(self, items: list[dict], stats: TokenizeStats):
        self.items = items
        self.stats = stats

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class LazyDataset(Dataset):
    """Tokenizes a sample the first time it is used (Qwen's --lazy_preprocess)."""

    def __init__(self, samples: list, tokenizer: PreTrainedTokenizerBase, max_length: int):
        self.samples = samples
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.cache: dict[int, dict] = {}
        self.stats = TokenizeStats()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        if i not in self.cache:
            item = tokenize_messages(self.tokenizer, self.samples[i], self.max_length, "truncate", self.stats)
            if item is None:
                # Truncation removed every assistant token: keep the sample but train its last token
                # rather than hand the loss an all-masked batch. Eager mode drops such samples instead.
                ids = tokenize_messages(self.tokenizer, self.samples[i], 10**9)["input_ids"][: self.max_length]
                item = {"input_ids": ids, "labels": [-100] * (len(ids) - 1) + ids[-1:]}
            self.cache[i] = item
        return self.cache[i]


def build_dataset(
    path: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    system_message: str,
    truncation: str = "truncate",
    lazy: bool = False,
    show_progress: bool = True,
) -> Dataset:
    samples = load_samples(path, system_message)
    if lazy:
        log.info("%s: %d samples, tokenized lazily as training reads them", path, len(samples))
        return LazyDataset(samples, tokenizer, max_length)

    stats = TokenizeStats()
    items = []
    iterator = samples
    if show_progress:
        from tqdm.auto import tqdm

        iterator = tqdm(samples, desc=f"Tokenizing {path}", unit="sample", mininterval=1.0)
    for messages in iterator:
        item = tokenize_messages(tokenizer, messages, max_length, truncation, stats)
        if item is not None:
            items.append(item)
    log.info("%s: %s", path, stats.summary(max_length))
    if not items:
        fix = "Raise --model_max_length" + (" or use --truncation truncate." if truncation == "drop" else ".")
        raise UsageError(f"{path}: every sample was dropped ({stats.summary(max_length)}). {fix}")
    return TokenizedDataset(items, stats)
