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
"""
from __future__ import annotations

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


def _spans_by_placeholders(tokenizer, messages, full: str, markers: list[str]) -> list[tuple[int, int]]:
    """Trained character spans of `full`, found from one rendering with placeholder contents."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    holders = {i: PLACEHOLDER.format(n) for n, i in enumerate(assistant)}
    skeleton = _render(tokenizer, [dict(m, content=holders[i]) if i in holders else m
                                   for i, m in enumerate(messages)], add_generation_prompt=False)
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
    full, spans = trained_spans(tokenizer, messages)
    segments, cursor = [], 0
    for start, end in spans:
        segments += [(full[cursor:start], False), (full[start:end], True)]
        cursor = end
    segments.append((full[cursor:], False))
    return [(text, trained) for text, trained in segments if text]


def _ids_and_labels(tokenizer, messages, stats=None) -> tuple[list[int], list[int]]:
    full, spans = trained_spans(tokenizer, messages)
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    if stats is not None and system.strip() and system.strip() not in full:
        # Mistral-7B-Instruct-v0.3's template renders the system prompt only into a last *user*
        # turn, so a training conversation (ending with a reply) loses it. Say so, do not hide it.
        stats.system_not_rendered += 1
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        input_ids, labels = list(encoded["input_ids"]), []
        span_iter, k = spans, 0
        for token, (begin, end) in zip(input_ids, encoded["offset_mapping"]):
            while k < len(span_iter) and span_iter[k][1] <= begin and not (begin == end == span_iter[k][1]):
                k += 1
            inside = k < len(span_iter) and (
                begin < span_iter[k][1] and end > span_iter[k][0] if end > begin
                else span_iter[k][0] <= begin < span_iter[k][1])
            labels.append(token if inside else IGNORE_INDEX)
        return input_ids, labels
    input_ids, labels = [], []
    for text, trained in segment_conversation(tokenizer, messages):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
    return input_ids, labels


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


def tokenize_messages(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    max_length: int,
    truncation: str = "truncate",
    stats: TokenizeStats | None = None,
) -> dict | None:
    """Return {"input_ids", "labels"} or None when the sample is dropped."""
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
