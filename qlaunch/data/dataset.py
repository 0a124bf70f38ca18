"""Training / evaluation datasets: eager (tokenized once, with statistics) or lazy.

Eager data comes from the tokenized-data cache (data/cache.py: Arrow on disk, memory-mapped) when
a cache directory is given, else it is tokenized in memory, in batches. Lazy data
(--lazy_preprocess) is never cached: each sample is tokenized when training reads it, and a .jsonl
file is read from disk record by record, so files larger than memory train too.
"""
from __future__ import annotations

import logging

from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from qlaunch.config.errors import UsageError
from qlaunch.data.formats import JsonlSamples, load_samples
from qlaunch.data.tokenize import TokenizeStats, tokenize_batch, tokenize_messages

log = logging.getLogger("qlaunch")

BATCH = 1000  # conversations per tokenize_batch call on the in-memory path


class TokenizedDataset(Dataset):
    """All samples tokenized up front, so truncation/drop counts are known before training.

    items: a list of {"input_ids", "labels"} dicts, or a datasets.Dataset with those two columns
    (memory-mapped Arrow from the cache: every rank on a machine shares the same pages)."""

    def __init__(self, items, stats: TokenizeStats, cache_entry: str | None = None):
        self.items = items
        self.stats = stats
        self.cache_entry = cache_entry  # the cache entry the rows are mapped from (packing keeps its plan there)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    @property
    def lengths(self) -> list[int]:
        """Every sample's token count (read from Arrow without converting the rows, when cached)."""
        if isinstance(self.items, list):
            return [len(item["input_ids"]) for item in self.items]
        import pyarrow.compute as pc

        return pc.list_value_length(self.items.data.column("input_ids")).to_pylist()


class LazyDataset(Dataset):
    """Tokenizes a sample each time it is used (Qwen's --lazy_preprocess); keeps nothing tokenized.

    samples: a list, or formats.JsonlSamples (a .jsonl file read record by record from disk), so
    memory does not grow with the data. Qwen's lazy dataset keeps every tokenized sample it has
    served, which ends with the whole tokenized set in every process; here an epoch re-tokenizes
    instead, and the statistics count each sample once (a byte of bookkeeping per sample)."""

    def __init__(self, samples, tokenizer: PreTrainedTokenizerBase, max_length: int):
        self.samples = samples
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.counted = bytearray(len(samples))
        self.stats = TokenizeStats()

    def __len__(self) -> int:
        return len(self.samples)

    def _tokenize(self, j: int) -> dict | None:
        first = not self.counted[j]
        self.counted[j] = 1
        item = tokenize_messages(self.tokenizer, self.samples[j], self.max_length, "truncate",
                                 self.stats if first else None)
        if item is None and first:
            log.warning("sample %d has no assistant tokens within %d tokens; training on another "
                        "sample in its place (raise --model_max_length)", j, self.max_length)
        return item

    def __getitem__(self, i: int) -> dict:
        # A sample that truncation leaves without assistant tokens would give an all-masked loss;
        # eager mode drops it, lazy mode stands in the next usable sample for it.
        for offset in range(len(self.samples)):
            item = self._tokenize((i + offset) % len(self.samples))
            if item is not None:
                return item
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
    cache_dir: str | None = None,
    num_proc: int | None = None,
    verify_cache: bool = True,
) -> Dataset:
    """The dataset of one data file. cache_dir: the tokenized-data cache's directory (None: tokenize
    in memory); num_proc: worker processes for a cache build (None: by size and CPUs); verify_cache:
    check the cached content here (False: trust the process of this node that checked it first)."""
    if lazy:
        # .jsonl: read from disk record by record (files larger than memory); .json is one JSON value
        samples = JsonlSamples(path, system_message) if path.endswith(".jsonl") else load_samples(path, system_message)
        log.info("%s: %d samples, tokenized lazily as training reads them (not cached%s)", path, len(samples),
                 ", read from disk" if isinstance(samples, JsonlSamples) else "")
        return LazyDataset(samples, tokenizer, max_length)
    if cache_dir is not None:
        from qlaunch.data.cache import cached_tokenization, entry_of

        rows, stats, _ = cached_tokenization(path, tokenizer, cache_dir, max_length=max_length,
                                             truncation=truncation, system_message=system_message,
                                             show_progress=show_progress, num_proc=num_proc, verify=verify_cache)
        log.info("%s: %s", path, stats.summary(max_length))
        return TokenizedDataset(rows, stats, cache_entry=entry_of(rows))
    samples = load_samples(path, system_message)
    stats, items = TokenizeStats(), []
    progress = None
    if show_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(samples), desc=f"Tokenizing {path}", unit="sample", mininterval=1.0)
    for start in range(0, len(samples), BATCH):
        batch = samples[start:start + BATCH]
        items += [item for item in tokenize_batch(tokenizer, batch, max_length, truncation, stats) if item is not None]
        if progress is not None:
            progress.update(len(batch))
    if progress is not None:
        progress.close()
    log.info("%s: %s", path, stats.summary(max_length))
    if not items:
        fix = "Raise --model_max_length" + (" or use --truncation truncate." if truncation == "drop" else ".")
        raise UsageError(f"{path}: every sample was dropped ({stats.summary(max_length)}). {fix}")
    return TokenizedDataset(items, stats)


def build_on_main_first(training_args, build):
    """Run build() so that one process per cache directory does the work and the others reuse it.

    The main process builds first while every other process waits; then the others run build(),
    which finds the cache and memory-maps it. A process that still finds nothing (the cache
    directory is node-local, on another node) builds it for its node: the first process of each
    node goes first there, the rest of the node waits for it. Without a cache every process
    tokenizes for itself (rank 0 first), as before. One process: build() once."""
    result, done = None, False
    with training_args.main_process_first(local=False, desc="tokenizing"):
        if training_args.process_index == 0:
            result, done = build(), True
    with training_args.main_process_first(local=True, desc="tokenizing"):
        if not done:
            result = build()
    return result
