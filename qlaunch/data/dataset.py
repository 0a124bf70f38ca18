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
        # A sample that truncation leaves without assistant tokens would give an all-masked loss;
        # eager mode drops it, lazy mode stands in the next usable sample for it.
        for offset in range(len(self.samples)):
            j = (i + offset) % len(self.samples)
            if j not in self.cache:
                self.cache[j] = tokenize_messages(self.tokenizer, self.samples[j], self.max_length, "truncate",
                                                  self.stats)
                if self.cache[j] is None:
                    log.warning("sample %d has no assistant tokens within %d tokens; training on another "
                                "sample in its place (raise --model_max_length)", j, self.max_length)
            if self.cache[j] is not None:
                return self.cache[j]
        raise UsageError(f"no sample keeps an assistant token within --model_max_length {self.max_length}.")


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
