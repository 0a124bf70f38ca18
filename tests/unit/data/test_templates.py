"""Label masks on the chat templates real checkpoints ship (tokenizers in ../shared/models).

For each: the ids equal tokenizing the whole rendered conversation at once, and the trained
tokens are exactly each assistant reply plus the markup that closes it up to its end-of-turn
token — one trained run per assistant turn, ending with that token.
"""
import os

import pytest

from qlaunch.data.labels import IGNORE_INDEX
from qlaunch.data.templates import ensure_chat_template
from qlaunch.data.tokenize import tokenize_messages
from tests.conftest import REPO

MODELS = os.path.join(os.path.dirname(REPO), "shared", "models")
CONVERSATION = [
    {"role": "system", "content": "Answer with one word."},
    {"role": "user", "content": "Opposite of up?"},
    {"role": "assistant", "content": "down"},
    {"role": "user", "content": "And of big?"},
    {"role": "assistant", "content": "Small, of course."},
]
# folder → (template used, end-of-turn token)
CASES = {
    "qwen2.5-instruct": ("tokenizer", "<|im_end|>"),
    "llama-3-instruct": ("tokenizer", "<|eot_id|>"),
    "mistral-7b-instruct-v0.3": ("tokenizer", "</s>"),
    "llama-2-chat": ("llama2", "</s>"),
}


def load(name):
    path = os.path.join(MODELS, name)
    if not os.path.isdir(path):
        pytest.skip(f"{path} not present (../shared/models is only beside the CI checkout)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer, ensure_chat_template(tokenizer)


def trained_runs(item):
    runs, current = [], []
    for token, label in zip(item["input_ids"], item["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("name", list(CASES))
def test_real_template_masks_exactly_the_replies(name):
    tokenizer, template = load(name)
    expected_template, end_of_turn = CASES[name]
    assert template == expected_template
    item = tokenize_messages(tokenizer, CONVERSATION, 4096)
    whole = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert item["input_ids"] == tokenizer(whole, add_special_tokens=False)["input_ids"]
    runs = trained_runs(item)
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert len(runs) == len(replies)
    eot = tokenizer.convert_tokens_to_ids(end_of_turn)
    for run, reply in zip(runs, replies):
        assert run[-1] == eot  # the end-of-turn token is trained: generation learns to stop
        assert eot not in run[:-1]
        text = tokenizer.decode(run[:-1]).strip()
        assert text == reply, (name, text, reply)
    # Nothing of the system prompt or the user turns is trained.
    trained = tokenizer.decode([t for run in runs for t in run])
    assert "Opposite" not in trained and "one word" not in trained


def test_mistral_template_that_rewrites_earlier_turns_is_masked_and_its_dropped_system_prompt_reported():
    """Mistral v0.3 renders the system prompt into the *last user* turn: adding a turn changes
    earlier text (the old prefix renderer refused every conversation with a system prompt), and a
    conversation ending with a reply loses the system prompt. Masked exactly; the loss is counted."""
    from qlaunch.data.tokenize import TokenizeStats

    tokenizer, _ = load("mistral-7b-instruct-v0.3")
    prompt_only = tokenizer.apply_chat_template(CONVERSATION[:4], tokenize=False)
    assert "Answer with one word." in prompt_only.split("[INST]")[-1]  # moved into the last user turn
    with_reply = tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert not prompt_only.startswith(with_reply.split("</s>")[0] + "</s>[INST] And")  # earlier text rewritten
    stats = TokenizeStats()
    item = tokenize_messages(tokenizer, CONVERSATION, 4096, stats=stats)
    assert [tokenizer.decode(r[:-1]).strip() for r in trained_runs(item)] == ["down", "Small, of course."]
    assert stats.system_not_rendered == 1 and "left out the system prompt of 1 samples" in stats.summary(4096)


def test_llama2_without_template_gets_its_chat_format_ending_in_eos():
    tokenizer, template = load("llama-2-chat")
    assert template == "llama2" and tokenizer.convert_tokens_to_ids("<|im_start|>") == tokenizer.unk_token_id
    whole = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert whole.startswith("<s>[INST] <<SYS>>\nAnswer with one word.\n<</SYS>>\n\nOpposite of up? [/INST] down </s>")
    item = tokenize_messages(tokenizer, CONVERSATION, 4096)
    assert all(run[-1] == tokenizer.eos_token_id for run in trained_runs(item))
