"""Canonical messages → input_ids + labels, through the tokenizer's own chat template.

Only assistant content and the end-of-turn token that closes it are labels; the system
prompt, user turns, role headers, the newline after an end-of-turn token and padding are -100.

How: the template is rendered for each prefix of the conversation. The text an assistant
turn adds after the generation prompt is its content plus the template's closing markup;
we train the content and the closing markup up to and including the first end-of-turn token.
The conversation is then tokenized segment by segment (trained / not trained), which works
for any tokenizer, fast or not (Qwen-7B's tiktoken tokenizer has no offset mapping).
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


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """Give the tokenizer ChatML when it has no template; return which one is used."""
    if getattr(tokenizer, "chat_template", None):
        return "tokenizer"
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
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def segment_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, trained) segments."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    markers = _end_markers(tokenizer)
    segments: list[tuple[str, bool]] = []
    cursor = 0  # how much of `full` is already in segments
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise UsageError(
                "the chat template does not render conversations prefix by prefix (it rewrites earlier turns), "
                "so assistant turns cannot be located for the label mask. Use a tokenizer whose template is "
                "append-only, or set a different chat template."
            )
        turn = through[len(before):]
        content = message["content"].strip()
        content_at = turn.find(content) if content else 0
        search_from = content_at + len(content) if content_at >= 0 else 0
        # The earliest end-of-turn marker after the content (longest marker wins a tie).
        found = [(at, -len(m)) for m in markers if (at := turn.find(m, search_from)) >= 0]
        if found:
            at, neg_len = min(found)
            end = at - neg_len
        else:  # the template closes turns with no special token: train the whole turn
            end = len(turn)
        segments.append((full[cursor: len(before)], False))
        segments.append((turn[:end], True))
        cursor = len(before) + end
    segments.append((full[cursor:], False))
    return [(text, trained) for text, trained in segments if text]


@dataclass
class TokenizeStats:
    samples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)

    def summary(self, max_length: int) -> str:
        kept = self.samples - self.dropped
        text = (
            f"{self.samples} samples → {kept} kept; {self.truncated} truncated to {max_length} tokens, "
            f"{self.dropped} dropped; {self.tokens} tokens ({self.trained_tokens} trained), longest {self.longest}"
        )
        if self.drop_reasons:
            text += " (" + ", ".join(f"{n} {why}" for why, n in self.drop_reasons.items()) + ")"
        return text


def tokenize_messages(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    max_length: int,
    truncation: str = "truncate",
    stats: TokenizeStats | None = None,
) -> dict | None:
    """Return {"input_ids", "labels"} or None when the sample is dropped."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in segment_conversation(tokenizer, messages):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))

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
