"""Chat templates: which template a tokenizer uses, how a conversation renders, and where in the
rendering the trained text lies (character spans).

Only assistant content and the end-of-turn token that closes it are trained; the system prompt,
user turns, role headers and the newline after an end-of-turn token are not.

How: the conversation is rendered once, and once more with every assistant content replaced by
a unique placeholder. The placeholders show where each assistant content sits in the real
rendering, whatever the template does around them — including templates that rewrite earlier
turns (Mistral-7B-Instruct-v0.3 moves the system prompt into the last user turn). A trained span
is the content plus the closing markup up to and including the first end-of-turn marker after
it. Two renders per conversation, not one per assistant turn. Templates whose turns end with no
marker fall back to rendering prefix by prefix (the end of a turn is where the next prefix
starts). Tokens are matched to these spans in qlaunch.data.labels; qlaunch.data.tokenize batches.
"""
from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from qlaunch.config.errors import UsageError

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


def end_markers(tokenizer: PreTrainedTokenizerBase) -> list[str]:
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


class NoEndMarker(Exception):
    pass


PLACEHOLDER = "QLAUNCHASSISTANT{}X"


def with_placeholders(messages: list[dict]) -> list[dict]:
    """The conversation with every assistant content replaced by its unique placeholder."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    holders = {i: PLACEHOLDER.format(n) for n, i in enumerate(assistant)}
    return [dict(m, content=holders[i]) if i in holders else m for i, m in enumerate(messages)]


def _spans_by_placeholders(tokenizer, messages, full: str, markers: list[str]) -> list[tuple[int, int]]:
    """Trained character spans of `full`, found from one rendering with placeholder contents."""
    skeleton = _render(tokenizer, with_placeholders(messages), add_generation_prompt=False)
    return locate_spans(messages, full, skeleton, markers)


def locate_spans(messages, full: str, skeleton: str, markers: list[str]) -> list[tuple[int, int]]:
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
            raise NoEndMarker
        spans.append((pos, end))
        pos = content_end + len(after)
    return spans


def spans_by_prefixes(tokenizer, messages, full: str, markers: list[str]) -> list[tuple[int, int]]:
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
    markers = end_markers(tokenizer)
    try:
        return full, _spans_by_placeholders(tokenizer, messages, full, markers)
    except NoEndMarker:
        return full, spans_by_prefixes(tokenizer, messages, full, markers)


def segment_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, trained) segments."""
    return segments(*trained_spans(tokenizer, messages))


def system_not_rendered(messages, full: str) -> bool:
    # Mistral-7B-Instruct-v0.3's template renders the system prompt only into a last *user*
    # turn, so a training conversation (ending with a reply) loses it. Say so, do not hide it.
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    return bool(system.strip()) and system.strip() not in full


def _plain(value) -> bool:
    """Exact str values only (what formats.py produces), in dicts of a list."""
    return all(type(m) is dict and all(type(k) is str and type(v) is str for k, v in m.items()) for m in value)


def _direct_renderer(tokenizer):
    """The compiled chat template called as apply_chat_template calls it, or None.

    For conversations of plain {"role": str, "content": str} dicts, apply_chat_template's own
    preparation (transformers 5: _normalize_chat_messages, _plain_template_data,
    _alias_reasoning_fields) only copies them, and costs as much as the render itself; this calls
    the same compiled template (transformers' compile cache) with the same arguments. Used only when
    the first conversation of a batch renders identically both ways (see render_batch)."""
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


def render_batch(tokenizer, conversations: list[list[dict]]) -> list[str]:
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


def segments(full: str, spans) -> list[tuple[str, bool]]:
    segments, cursor = [], 0
    for start, end in spans:
        segments += [(full[cursor:start], False), (full[start:end], True)]
        cursor = end
    segments.append((full[cursor:], False))
    return [(text, trained) for text, trained in segments if text]
