"""Canonical messages → input_ids + labels, through the tokenizer's own chat template.

Only assistant content and the end-of-turn token that closes it are labels; the system
prompt, user turns, role headers, the newline after an end-of-turn token and padding are -100.

How: the conversation is rendered once, and once more with every assistant content replaced by
a unique placeholder. The placeholders show where each assistant content sits in the real
rendering, whatever the template does around them — including templates that rewrite earlier
turns (Mistral-7B-Instruct-v0.3 moves the system prompt into the last user turn). A trained span
is the content plus the closing markup up to and including the first end-of-turn marker after
it. Two renders per conversation, not one per assistant turn. The whole rendering is then
tokenized at once and a token is trained when it overlaps a trained span, so the ids are exactly
those of the whole conversation. Templates whose turns end with no marker fall back to rendering
prefix by prefix (the end of a turn is where the next prefix starts); tokenizers without offsets
(Qwen-7B's tiktoken) are tokenized span by span.

Many conversations at once (tokenize_batch, what the datasets cache maps over): two batched
template calls, one batched call of the fast tokenizer with offsets, and each span's tokens found
by bisection. tokenize_messages is a batch of one; tokenize_messages_per_sample keeps the former
one-call-per-conversation path as the reference the batched one is tested against (equal ids,
labels and statistics) and as the baseline row of bench/tokenization.py.
"""
from __future__ import annotations

import bisect
import operator
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from qlaunch.errors import UsageError

IGNORE_INDEX = -100

# ChatML, used when a tokenizer ships no chat template (Qwen-7B-Chat's own format).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# End-of-turn markers of common templates, in addition to the tokenizer's special tokens.
KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")


# Llama-2-chat's own format (Meta's reference code; the template its later hub revisions ship):
# each answer ends with EOS, which is trained, so generation stops at EOS.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def _has_tokens(tokenizer, tokens) -> bool | None:
    """Whether every token is one id of the vocabulary (None: cannot tell)."""
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        return None
    return all(t in vocab for t in tokens)


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """Give the tokenizer a template when it has none; return which one is used.

    ChatML when its markers are tokens of the vocabulary (Qwen-7B's tiktoken tokenizer). A
    tokenizer without them (Llama-2 style) would see ChatML's markers as several ordinary tokens
    and never learn a stop token; it gets Llama-2's chat format instead, whose answers end with
    the tokenizer's EOS — what Llama-2-chat was trained on, and a stop that generate() knows."""
    if getattr(tokenizer, "chat_template", None):
        return "tokenizer"
    if _has_tokens(tokenizer, CHATML_TOKENS) is False and tokenizer.eos_token:
        tokenizer.chat_template = LLAMA2_TEMPLATE
        return "llama2"
    tokenizer.chat_template = CHATML_TEMPLATE
    return "chatml"


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Padding needs an id; labels never depend on it (padding is masked by position)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        elif getattr(tokenizer, "eod_id", None) is not None:  # Qwen-7B's tiktoken tokenizer (as Qwen pads)
            tokenizer.pad_token_id = tokenizer.eod_id
        else:
            raise UsageError("the tokenizer has no pad, eos or unk token to pad with; add a pad token to the tokenizer.")


def _end_markers(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    markers = set(KNOWN_END_OF_TURN)
    markers.update(t for t in getattr(tokenizer, "all_special_tokens", []) if t)
    if tokenizer.eos_token:
        markers.add(tokenizer.eos_token)
    return sorted(markers, key=len, reverse=True)


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja's raise_exception (e.g. roles must alternate) and template errors
        raise UsageError(f"the chat template refused a conversation: {e}. Fix the record (e.g. alternate "
                         "user/assistant turns) or use a different chat template.") from None


def _end_after(text: str, start: int, stop: int, markers: list[str]) -> int | None:
    """Index just past the earliest end-of-turn marker in text[start:stop] (longest wins a tie)."""
    found = [(at, -len(m)) for m in markers if 0 <= (at := text.find(m, start, stop))]
    if not found:
        return None
    at, neg_len = min(found)
    return at - neg_len


class _NoEndMarker(Exception):
    pass


PLACEHOLDER = "QLAUNCHASSISTANT{}X"


def _with_placeholders(messages: list[dict]) -> list[dict]:
    """The conversation with every assistant content replaced by its unique placeholder."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    holders = {i: PLACEHOLDER.format(n) for n, i in enumerate(assistant)}
    return [dict(m, content=holders[i]) if i in holders else m for i, m in enumerate(messages)]


def _spans_by_placeholders(tokenizer, messages, full: str, markers: list[str]) -> list[tuple[int, int]]:
    """Trained character spans of `full`, found from one rendering with placeholder contents."""
    skeleton = _render(tokenizer, _with_placeholders(messages), add_generation_prompt=False)
    return _locate_spans(messages, full, skeleton, markers)


def _locate_spans(messages, full: str, skeleton: str, markers: list[str]) -> list[tuple[int, int]]:
    """Trained character spans of `full`, given its rendering with placeholder assistant contents."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    holders = {i: PLACEHOLDER.format(n) for n, i in enumerate(assistant)}
    pieces, rest = [], skeleton
    for n, i in enumerate(assistant):
        before, sep, rest = rest.partition(holders[i])
        if not sep or holders[i] in rest:
            raise UsageError(
                f"the chat template does not render assistant turn {n + 1} of {len(assistant)} exactly once (it "
                "drops or repeats earlier turns, as templates that strip past reasoning do), so that turn cannot "
                "be trained as rendered. Keep one assistant turn per record, or use a different chat template."
            )
        pieces.append(before)
    pieces.append(rest)
    if not full.startswith(pieces[0]):
        raise UsageError("the chat template renders assistant contents into the text before them; "
                         "its label mask cannot be located. Use a different chat template.")
    spans, pos = [], len(pieces[0])
    for n, i in enumerate(assistant):
        after = pieces[n + 1]
        content = messages[i]["content"]
        # Templates may trim the content (Llama-3, Mistral): accept it as given or stripped.
        rendered = next((c for c in (content, content.strip()) if full.startswith(c + after, pos)), None)
        if rendered is None:
            raise UsageError(f"the chat template changes the text of assistant turn {n + 1} beyond trimming; "
                             "its label mask cannot be located. Use a different chat template.")
        content_end = pos + len(rendered)
        end = _end_after(full, content_end, content_end + len(after), markers)
        if end is None:
            raise _NoEndMarker
        spans.append((pos, end))
        pos = content_end + len(after)
    return spans


def _spans_by_prefixes(tokenizer, messages, full: str, markers: list[str]) -> list[tuple[int, int]]:
    """For templates that close turns with no marker: the turn is what its prefix rendering adds."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise UsageError(
                "the chat template closes assistant turns with no end-of-turn token and does not render "
                "conversations prefix by prefix, so where a turn ends cannot be located for the label mask. "
                "Use a template that ends turns with a special token."
            )
        turn = through[len(before):]
        content = message["content"].strip()
        content_at = turn.find(content) if content else 0
        search_from = content_at + len(content) if content_at >= 0 else 0
        end = _end_after(turn, search_from, len(turn), markers)
        spans.append((len(before), len(before) + (len(turn) if end is None else end)))
    return spans


def trained_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans whose tokens are trained."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    markers = _end_markers(tokenizer)
    try:
        return full, _spans_by_placeholders(tokenizer, messages, full, markers)
    except _NoEndMarker:
        return full, _spans_by_prefixes(tokenizer, messages, full, markers)


def segment_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, trained) segments."""
    return _segments(*trained_spans(tokenizer, messages))


def _labels_by_scan(input_ids, offsets, spans) -> list[int]:
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


def _labels_by_bisect(input_ids: list[int], offsets, spans) -> list[int]:
    """The same labels as _labels_by_scan, found per span instead of per token.

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
        return _labels_by_scan(input_ids, offsets, spans)
    labels = [IGNORE_INDEX] * len(input_ids)
    for start, end in spans:
        lo, hi = bisect.bisect_right(ends, start), bisect.bisect_left(begins, end)
        labels[lo:hi] = input_ids[lo:hi]
    return labels


def _system_not_rendered(messages, full: str) -> bool:
    # Mistral-7B-Instruct-v0.3's template renders the system prompt only into a last *user*
    # turn, so a training conversation (ending with a reply) loses it. Say so, do not hide it.
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    return bool(system.strip()) and system.strip() not in full


def _ids_and_labels(tokenizer, messages, stats=None) -> tuple[list[int], list[int]]:
    """One conversation, as qlaunch tokenized before batching (the per-sample reference path)."""
    full, spans = trained_spans(tokenizer, messages)
    if stats is not None and _system_not_rendered(messages, full):
        stats.system_not_rendered += 1
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = list(encoded["input_ids"])
        return input_ids, _labels_by_scan(input_ids, encoded["offset_mapping"], spans)
    input_ids, labels = [], []
    for text, trained in segment_conversation(tokenizer, messages):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
    return input_ids, labels


def _plain(value) -> bool:
    """Exact str values only (what formats.py produces), in dicts of a list."""
    return all(type(m) is dict and all(type(k) is str and type(v) is str for k, v in m.items()) for m in value)


def _direct_renderer(tokenizer):
    """The compiled chat template called as apply_chat_template calls it, or None.

    For conversations of plain {"role": str, "content": str} dicts, apply_chat_template's own
    preparation (transformers 5: _normalize_chat_messages, _plain_template_data,
    _alias_reasoning_fields) only copies them, and costs as much as the render itself; this calls
    the same compiled template (transformers' compile cache) with the same arguments. Used only when
    the first conversation of a batch renders identically both ways (see _render_batch)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
        template = tokenizer.get_chat_template()
        compiled = _compile_jinja_template(template)
    except Exception:  # noqa: BLE001 - a transformers without these internals: apply_chat_template
        return None
    kwargs = dict(tokenizer.special_tokens_map)
    if not all(type(v) is str for v in kwargs.values()):
        return None
    return lambda messages: compiled.render(messages=messages, tools=None, documents=None,
                                            add_generation_prompt=False, **kwargs)


def _render_batch(tokenizer, conversations: list[list[dict]]) -> list[str]:
    """Each conversation rendered by the chat template exactly as apply_chat_template renders it.
    A batch the template refuses is rendered one by one, so the error names the problem."""
    if not conversations:
        return []
    try:
        render = _direct_renderer(tokenizer) if all(_plain(m) for m in conversations) else None
        if render is not None and render(conversations[0]) == _render(tokenizer, conversations[0], False):
            return [render(messages) for messages in conversations]
        return list(tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=False))
    except Exception:  # noqa: BLE001 - re-rendered one by one below for the message
        return [_render(tokenizer, messages, add_generation_prompt=False) for messages in conversations]


def encode_conversations(tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict]]):
    """Many conversations → [(input_ids, labels, system_not_rendered)], equal to _ids_and_labels each.

    Batched: the conversations and their placeholder skeletons are rendered in two template calls,
    end-of-turn markers are gathered once, the renderings are tokenized in one call of the fast
    tokenizer, and each trained span's tokens are found by bisection instead of token by token."""
    fulls = _render_batch(tokenizer, conversations)
    skeletons = _render_batch(tokenizer, [_with_placeholders(m) for m in conversations])
    markers = _end_markers(tokenizer)
    all_spans = []
    for messages, full, skeleton in zip(conversations, fulls, skeletons):
        try:
            all_spans.append(_locate_spans(messages, full, skeleton, markers))
        except _NoEndMarker:  # templates that end turns with no marker: prefix renderings, as before
            all_spans.append(_spans_by_prefixes(tokenizer, messages, full, markers))
    flags = [_system_not_rendered(m, full) for m, full in zip(conversations, fulls)]
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(fulls, add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for ids, offsets, spans, flag in zip(encoded["input_ids"], encoded["offset_mapping"], all_spans, flags):
            ids = list(ids)
            out.append((ids, _labels_by_bisect(ids, offsets, spans), flag))
        return out
    out = []  # no offsets (Qwen-7B's tiktoken tokenizer): span by span, as before
    for full, spans, flag in zip(fulls, all_spans, flags):
        input_ids, labels = [], []
        for text, trained in _segments(full, spans):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            input_ids.extend(ids)
            labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
        out.append((input_ids, labels, flag))
    return out


def _segments(full: str, spans) -> list[tuple[str, bool]]:
    segments, cursor = [], 0
    for start, end in spans:
        segments += [(full[cursor:start], False), (full[start:end], True)]
        cursor = end
    segments.append((full[cursor:], False))
    return [(text, trained) for text, trained in segments if text]


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
