"""Canonical messages → input_ids + labels, one conversation or many at once.

The rendering and its trained spans come from qlaunch.data.templates, the token labels and the
length policy from qlaunch.data.labels; the whole rendering is tokenized at once and a token is
trained when it overlaps a trained span, so the ids are exactly those of the whole conversation.
Tokenizers without offsets (Qwen-7B's tiktoken) are tokenized span by span.

Many conversations at once (tokenize_batch, what the datasets cache maps over): two batched
template calls, one batched call of the fast tokenizer with offsets, and each span's tokens found
by bisection. tokenize_messages is a batch of one; tokenize_messages_per_sample keeps the former
one-call-per-conversation path as the reference the batched one is tested against (equal ids,
labels and statistics) and as the baseline row of bench/tokenization.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from qlaunch.data.labels import (
    DROPPED_NO_LABELS,
    DROPPED_TOO_LONG,
    IGNORE_INDEX,
    TRUNCATED,
    apply_length_policy,
    labels_by_bisect,
    labels_by_scan,
)
from qlaunch.data.templates import (
    NoEndMarker,
    end_markers,
    locate_spans,
    render_batch,
    segment_conversation,
    segments,
    spans_by_prefixes,
    system_not_rendered,
    trained_spans,
    with_placeholders,
)


def _ids_and_labels(tokenizer, messages, stats=None) -> tuple[list[int], list[int]]:
    """One conversation, as qlaunch tokenized before batching (the per-sample reference path)."""
    full, spans = trained_spans(tokenizer, messages)
    if stats is not None and system_not_rendered(messages, full):
        stats.system_not_rendered += 1
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = list(encoded["input_ids"])
        return input_ids, labels_by_scan(input_ids, encoded["offset_mapping"], spans)
    input_ids, labels = [], []
    for text, trained in segment_conversation(tokenizer, messages):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
    return input_ids, labels


def encode_conversations(tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict]]):
    """Many conversations → [(input_ids, labels, system_not_rendered)], equal to _ids_and_labels each.

    Batched: the conversations and their placeholder skeletons are rendered in two template calls,
    end-of-turn markers are gathered once, the renderings are tokenized in one call of the fast
    tokenizer, and each trained span's tokens are found by bisection instead of token by token."""
    fulls = render_batch(tokenizer, conversations)
    skeletons = render_batch(tokenizer, [with_placeholders(m) for m in conversations])
    markers = end_markers(tokenizer)
    all_spans = []
    for messages, full, skeleton in zip(conversations, fulls, skeletons):
        try:
            all_spans.append(locate_spans(messages, full, skeleton, markers))
        except NoEndMarker:  # templates that end turns with no marker: prefix renderings, as before
            all_spans.append(spans_by_prefixes(tokenizer, messages, full, markers))
    flags = [system_not_rendered(m, full) for m, full in zip(conversations, fulls)]
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(fulls, add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for ids, offsets, spans, flag in zip(encoded["input_ids"], encoded["offset_mapping"], all_spans, flags):
            ids = list(ids)
            out.append((ids, labels_by_bisect(ids, offsets, spans), flag))
        return out
    out = []  # no offsets (Qwen-7B's tiktoken tokenizer): span by span, as before
    for full, spans, flag in zip(fulls, all_spans, flags):
        input_ids, labels = [], []
        for text, trained in segments(full, spans):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            input_ids.extend(ids)
            labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
        out.append((input_ids, labels, flag))
    return out


@dataclass
class TokenizeStats:
    samples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)
    system_not_rendered: int = 0  # samples whose system prompt the chat template left out

    def add(self, *, length: int, status: int, tokens: int, trained: int, system_not_rendered: bool,
            max_length: int) -> None:
        """Count one sample: its full length, what the length policy did, the kept tokens."""
        self.samples += 1
        self.longest = max(self.longest, length)
        self.system_not_rendered += int(system_not_rendered)
        if status in (TRUNCATED, DROPPED_NO_LABELS):
            self.truncated += 1
        if status in (DROPPED_TOO_LONG, DROPPED_NO_LABELS):
            reason = (f"longer than {max_length} tokens" if status == DROPPED_TOO_LONG
                      else "with no assistant tokens left after truncation")
            self.dropped += 1
            self.drop_reasons[reason] = self.drop_reasons.get(reason, 0) + 1
            return
        self.tokens += tokens
        self.trained_tokens += trained

    def summary(self, max_length: int) -> str:
        kept = self.samples - self.dropped
        text = (
            f"{self.samples} samples → {kept} kept; {self.truncated} truncated to {max_length} tokens, "
            f"{self.dropped} dropped; {self.tokens} tokens ({self.trained_tokens} trained), longest {self.longest}"
        )
        if self.drop_reasons:
            text += " (" + ", ".join(f"{n} {why}" for why, n in self.drop_reasons.items()) + ")"
        if self.system_not_rendered:
            text += (f"; the chat template left out the system prompt of {self.system_not_rendered} samples "
                     "(Mistral v0.3's renders it only into a last user turn)")
        return text


def tokenize_rows(tokenizer, conversations, max_length: int, truncation: str = "truncate") -> dict[str, list]:
    """A batch of conversations → columns: input_ids, labels (empty when dropped), and per sample
    its full length, status (KEPT/TRUNCATED/DROPPED_*), trained-token count and system flag."""
    columns = {"input_ids": [], "labels": [], "length": [], "status": [], "trained": [], "system_not_rendered": []}
    for input_ids, labels, flag in encode_conversations(tokenizer, conversations):
        length = len(input_ids)
        input_ids, labels, status = apply_length_policy(input_ids, labels, max_length, truncation)
        dropped = status in (DROPPED_TOO_LONG, DROPPED_NO_LABELS)
        columns["input_ids"].append([] if dropped else input_ids)
        columns["labels"].append([] if dropped else labels)
        columns["length"].append(length)
        columns["status"].append(status)
        columns["trained"].append(0 if dropped else len(labels) - labels.count(IGNORE_INDEX))
        columns["system_not_rendered"].append(flag)
    return columns


def count_rows(stats: TokenizeStats, columns: dict[str, list], max_length: int,
               tokens: list[int] | None = None) -> TokenizeStats:
    """Add tokenize_rows' per-sample columns to stats (in row order); returns stats.
    tokens: each row's kept token count, when the input_ids column is not at hand."""
    if tokens is None:
        tokens = [len(ids) for ids in columns["input_ids"]]
    for n, length, status, trained, flag in zip(tokens, columns["length"], columns["status"], columns["trained"],
                                                columns["system_not_rendered"]):
        stats.add(length=length, status=status, tokens=n, trained=trained, system_not_rendered=flag,
                  max_length=max_length)
    return stats


def tokenize_batch(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict]],
    max_length: int,
    truncation: str = "truncate",
    stats: TokenizeStats | None = None,
) -> list[dict | None]:
    """[{"input_ids", "labels"} or None (dropped)] for many conversations at once."""
    columns = tokenize_rows(tokenizer, conversations, max_length, truncation)
    if stats is not None:
        count_rows(stats, columns, max_length)
    dropped = (DROPPED_TOO_LONG, DROPPED_NO_LABELS)
    return [None if status in dropped else {"input_ids": ids, "labels": labels}
            for ids, labels, status in zip(columns["input_ids"], columns["labels"], columns["status"])]


def tokenize_messages(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    max_length: int,
    truncation: str = "truncate",
    stats: TokenizeStats | None = None,
) -> dict | None:
    """Return {"input_ids", "labels"} or None when the sample is dropped."""
    return tokenize_batch(tokenizer, [messages], max_length, truncation, stats)[0]


def tokenize_messages_per_sample(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    max_length: int,
    truncation: str = "truncate",
    stats: TokenizeStats | None = None,
) -> dict | None:
    """qlaunch's tokenization before batching, one conversation per call: kept as the reference the
    batched path is tested against and as bench/tokenization.py's baseline row."""
    input_ids, labels = _ids_and_labels(tokenizer, messages, stats)

    if stats is not None:
        stats.samples += 1
        stats.longest = max(stats.longest, len(input_ids))
    reason = None
    if len(input_ids) > max_length:
        if truncation == "drop":
            reason = f"longer than {max_length} tokens"
        else:
            input_ids, labels = input_ids[:max_length], labels[:max_length]
            if stats is not None:
                stats.truncated += 1
            if all(label == IGNORE_INDEX for label in labels):
                reason = "with no assistant tokens left after truncation"
    if reason is not None:
        if stats is not None:
            stats.dropped += 1
            stats.drop_reasons[reason] = stats.drop_reasons.get(reason, 0) + 1
        return None
    if stats is not None:
        stats.tokens += len(input_ids)
        stats.trained_tokens += sum(label != IGNORE_INDEX for label in labels)
    return {"input_ids": input_ids, "labels": labels}
