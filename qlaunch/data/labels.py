"""Labels: which tokens are trained, and what the length policy does to a sample.

A token is trained when it overlaps a trained character span of the rendering (qlaunch.data.templates);
every other position is IGNORE_INDEX (-100), padding included. Samples longer than --model_max_length
are cut (`truncate`) or dropped (`drop`); a cut sample with no trained token left is dropped.
"""
from __future__ import annotations

import bisect
import operator

IGNORE_INDEX = -100


def labels_by_scan(input_ids, offsets, spans) -> list[int]:
    """A token is trained when it overlaps a trained span (an empty token: when it sits inside one)."""
    labels, k = [], 0
    for token, (begin, end) in zip(input_ids, offsets):
        while k < len(spans) and spans[k][1] <= begin and not (begin == end == spans[k][1]):
            k += 1
        inside = k < len(spans) and (
            begin < spans[k][1] and end > spans[k][0] if end > begin
            else spans[k][0] <= begin < spans[k][1])
        labels.append(token if inside else IGNORE_INDEX)
    return labels


def labels_by_bisect(input_ids: list[int], offsets, spans) -> list[int]:
    """The same labels as labels_by_scan, found per span instead of per token.

    When token offsets only move forward and no token is empty, and the spans are non-empty and
    in order, the tokens overlapping a span are one contiguous run: from the first token ending
    after the span's start to the last token beginning before its end (two bisections). Anything
    else (rare: empty tokens, offsets that go back) takes the token-by-token scan."""
    begins = [b for b, _ in offsets]
    ends = [e for _, e in offsets]
    ordered = (all(map(operator.le, begins, begins[1:])) and all(map(operator.le, ends, ends[1:]))
               and all(map(operator.lt, begins, ends))
               and all(s < e for s, e in spans) and all(e <= s for (_, e), (s, _) in zip(spans, spans[1:])))
    if not ordered:
        return labels_by_scan(input_ids, offsets, spans)
    labels = [IGNORE_INDEX] * len(input_ids)
    for start, end in spans:
        lo, hi = bisect.bisect_right(ends, start), bisect.bisect_left(begins, end)
        labels[lo:hi] = input_ids[lo:hi]
    return labels


# What the length policy did to a sample (stored per row in the tokenized-data cache).
KEPT, TRUNCATED, DROPPED_TOO_LONG, DROPPED_NO_LABELS = 0, 1, 2, 3


def apply_length_policy(input_ids, labels, max_length: int, truncation: str):
    """(input_ids, labels, status) after --truncation: cut to max_length, or dropped."""
    if len(input_ids) <= max_length:
        return input_ids, labels, KEPT
    if truncation == "drop":
        return input_ids, labels, DROPPED_TOO_LONG
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if labels.count(IGNORE_INDEX) == len(labels):
        return input_ids, labels, DROPPED_NO_LABELS
    return input_ids, labels, TRUNCATED
