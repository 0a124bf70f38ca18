"""Token-by-token label masks: only assistant content and its end-of-turn token are trained."""
import copy

import pytest
import torch

from qlaunch.data.formats import to_messages
from qlaunch.data.labels import IGNORE_INDEX
from qlaunch.data.tokenize import TokenizeStats, tokenize_messages
from qlaunch.train.trainer import make_collator

SYS = "You are a helpful assistant."


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def expected_chatml(tok, turns):
    """Build input_ids/labels by hand from ChatML pieces: (role, content) list."""
    input_ids, labels = [], []
    for role, content in turns:
        head = ids(tok, f"<|im_start|>{role}\n")
        if role == "assistant":
            body = ids(tok, content) + ids(tok, "<|im_end|>")
            tail = ids(tok, "\n")
            input_ids += head + body + tail
            labels += [IGNORE_INDEX] * len(head) + body + [IGNORE_INDEX] * len(tail)
        else:
            piece = ids(tok, f"<|im_start|>{role}\n{content}<|im_end|>\n")
            input_ids += piece
            labels += [IGNORE_INDEX] * len(piece)
    return input_ids, labels


def trained_text(tok, item):
    return tok.decode([t for t in item["labels"] if t != IGNORE_INDEX])


@pytest.mark.parametrize(
    "record",
    [
        {"id": "q", "conversations": [{"from": "user", "value": "Opposite of hot?"},
                                      {"from": "assistant", "value": "The opposite of hot is cold."}]},
        {"messages": [{"role": "user", "content": "Opposite of hot?"},
                      {"role": "assistant", "content": "The opposite of hot is cold."}]},
        {"instruction": "Opposite of hot?", "output": "The opposite of hot is cold."},
    ],
    ids=["qwen", "openai", "alpaca"],
)
def test_single_turn_mask_each_format(tokenizer, record):
    messages = to_messages(record, SYS)
    item = tokenize_messages(tokenizer, messages, 512)
    exp_ids, exp_labels = expected_chatml(
        tokenizer, [("system", SYS), ("user", "Opposite of hot?"), ("assistant", "The opposite of hot is cold.")]
    )
    assert item["input_ids"] == exp_ids
    assert item["labels"] == exp_labels
    assert trained_text(tokenizer, item) == "The opposite of hot is cold.<|im_end|>"
    # the newline after <|im_end|> is the last token and is not trained
    assert item["labels"][-1] == IGNORE_INDEX and item["labels"][-2] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_multi_turn_with_system_turn(tokenizer):
    turns = [("system", "Be brief."), ("user", "Opposite of up?"), ("assistant", "down"),
             ("user", "And of big?"), ("assistant", "small")]
    record = {"conversations": [{"from": r, "value": c} for r, c in turns]}
    item = tokenize_messages(tokenizer, to_messages(record, SYS), 512)
    exp_ids, exp_labels = expected_chatml(tokenizer, turns)
    assert item["input_ids"] == exp_ids
    assert item["labels"] == exp_labels
    assert trained_text(tokenizer, item) == "down<|im_end|>small<|im_end|>"


def test_pad_equals_eos_keeps_eos_label_and_masks_padding(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.eos_token  # pad == eos == <|im_end|>
    eos = tok.eos_token_id
    short = tokenize_messages(tok, to_messages({"instruction": "Opposite of up?", "output": "down"}, SYS), 512)
    long = tokenize_messages(tok, to_messages({"instruction": "Opposite of up?", "output": "down down down"}, SYS), 512)
    batch = make_collator(tok, on_gpu=False)([short, long])
    n = len(short["input_ids"])
    assert batch["input_ids"].shape[1] == len(long["input_ids"])  # padded to the batch's longest only
    assert torch.all(batch["labels"][0, n:] == IGNORE_INDEX)  # padding is never a label
    assert torch.all(batch["attention_mask"][0, n:] == 0)
    assert torch.all(batch["input_ids"][0, n:] == eos)
    # yet the real end-of-turn token (same id) is trained
    assert batch["labels"][0, n - 2].item() == eos
    assert (batch["labels"][0] == eos).sum().item() == 1


def test_truncate_keeps_prefix_and_counts(tokenizer):
    messages = to_messages({"instruction": "Opposite of hot?", "output": "The opposite of hot is cold."}, SYS)
    full = tokenize_messages(tokenizer, messages, 512)
    stats = TokenizeStats()
    cut = tokenize_messages(tokenizer, messages, len(full["input_ids"]) - 3, "truncate", stats)
    assert cut["input_ids"] == full["input_ids"][:-3]
    assert cut["labels"] == full["labels"][:-3]
    assert (stats.truncated, stats.dropped) == (1, 0)


def test_drop_mode_and_truncation_that_removes_all_labels(tokenizer):
    messages = to_messages({"instruction": "Opposite of hot?", "output": "cold"}, SYS)
    stats = TokenizeStats()
    assert tokenize_messages(tokenizer, messages, 10, "drop", stats) is None
    assert tokenize_messages(tokenizer, messages, 10, "truncate", stats) is None  # prompt alone > 10 tokens
    assert stats.dropped == 2 and stats.truncated == 1
    assert "2 dropped" in stats.summary(10)


def test_other_template_llama3_style(tokenizer):
    """A template with headers and <|eot_id|>: the header is not trained, <|eot_id|> is."""
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    item = tokenize_messages(tok, to_messages({"instruction": "Opposite of up?", "output": "down"}, ""), 512)
    assert trained_text(tok, item) == "down<|eot_id|>"
    assert item["labels"][-1] == tok.convert_tokens_to_ids("<|eot_id|>")


def test_template_without_end_token_trains_whole_turn(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    item = tokenize_messages(tok, to_messages({"instruction": "Opposite of up?", "output": "down"}, ""), 512)
    # The conversation is tokenized whole, so " down" (space included) is one token and it is trained.
    assert trained_text(tok, item) == " down\n"
    assert item["input_ids"] == ids(tok, tok.apply_chat_template(
        to_messages({"instruction": "Opposite of up?", "output": "down"}, ""), tokenize=False))


def test_lazy_dataset_tokenizes_on_access_and_skips_label_less_samples(tokenizer, tmp_path):
    import json

    from qlaunch.data.dataset import LazyDataset, build_dataset

    long_prompt = {"instruction": "word " * 80, "output": "ok"}
    short = {"instruction": "Opposite of up?", "output": "down"}
    path = tmp_path / "d.json"
    path.write_text(json.dumps([long_prompt, short]))
    data = build_dataset(str(path), tokenizer, max_length=40, system_message=SYS, lazy=True, show_progress=False)
    assert isinstance(data, LazyDataset) and data.stats.samples == 0  # nothing tokenized yet
    assert data[1]["labels"].count(IGNORE_INDEX) < len(data[1]["labels"])
    assert data[0] == data[1]  # the label-less long sample is replaced by the next usable one
    data[0], data[1]
    assert data.stats.samples == 2 and data.stats.dropped == 1  # each sample counted once


def test_lazy_jsonl_is_read_from_disk_and_equals_eager(tokenizer, tmp_path):
    """--lazy_preprocess on a .jsonl keeps only byte offsets (files larger than memory), reads each
    record when asked, also from forked DataLoader workers, and gives exactly the eager samples."""
    import json
    import pickle

    import torch

    from qlaunch.data.dataset import LazyDataset, build_dataset
    from qlaunch.data.formats import JsonlSamples

    records = [{"id": str(i), "conversations": [{"from": "user", "value": f"Opposite of {w}? " * 20},
                                                 {"from": "assistant", "value": f"not {w}"}]}
               for i, w in enumerate(["up", "hot", "big", "fast", "light", "open"] * 50)]
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in records]
    path.write_bytes(("\ufeff" + "\r\n".join(lines[:3]) + "\r\n\n" + "\n".join(lines[3:]) + "\n").encode())
    lazy = build_dataset(str(path), tokenizer, max_length=256, system_message=SYS, lazy=True, show_progress=False)
    eager = build_dataset(str(path), tokenizer, max_length=256, system_message=SYS, show_progress=False)
    assert isinstance(lazy, LazyDataset) and isinstance(lazy.samples, JsonlSamples)
    assert len(lazy) == len(eager) == len(records)
    assert len(pickle.dumps(lazy.samples)) < path.stat().st_size / 10  # offsets only, no parsed records
    assert [lazy[i] for i in range(len(lazy))] == [eager[i] for i in range(len(eager))]
    loader = torch.utils.data.DataLoader(lazy, batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    assert list(loader) == [eager[i] for i in range(len(eager))]


def test_collator_pads_right_to_longest_or_multiple(tokenizer):
    from qlaunch.data.collate import PaddingCollator

    items = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = PaddingCollator(pad_token_id=0)(items)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert PaddingCollator(pad_token_id=0, pad_to_multiple_of=8)(items)["input_ids"].shape == (2, 8)


def test_template_that_rewrites_history_is_refused(tokenizer):
    import pytest

    from qlaunch.config.errors import UsageError

    tok = copy.deepcopy(tokenizer)
    # Drops earlier assistant turns once a newer one exists (as reasoning-model templates do).
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    record = {"conversations": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"},
                                {"from": "user", "value": "c"}, {"from": "assistant", "value": "d"}]}
    with pytest.raises(UsageError, match="does not render assistant turn 1 of 2 exactly once"):
        tokenize_messages(tok, to_messages(record, SYS), 512)


# ---- the batched path (tokenize_batch, what the cache maps over) equals the per-sample one ----------
import os  # noqa: E402
import random  # noqa: E402

from tests.conftest import REPO  # noqa: E402

from qlaunch.data.labels import labels_by_bisect, labels_by_scan
from qlaunch.data.tokenize import tokenize_batch, tokenize_messages_per_sample

MODELS = os.path.join(REPO, "..", "shared", "models")


def random_conversations(n, seed=0):
    rng = random.Random(seed)
    words = "up down hot cold big small a the of é 数据 <|im_end|> \n  x".split(" ")
    out = []
    for _ in range(n):
        messages = [{"role": "system", "content": SYS}] if rng.random() < 0.7 else []
        for _ in range(rng.randint(1, 4)):
            messages.append({"role": "user", "content": " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))})
            reply = " ".join(rng.choice(words) for _ in range(rng.randint(0, 12)))
            messages.append({"role": "assistant", "content": rng.choice(["", " ", "\n"]) + reply + rng.choice(["", " "])})
        out.append(messages)
    return out


def assert_batch_equals_per_sample(tok, conversations, max_length, truncation):
    reference_stats, batch_stats = TokenizeStats(), TokenizeStats()
    reference = [tokenize_messages_per_sample(tok, m, max_length, truncation, reference_stats) for m in conversations]
    batched = tokenize_batch(tok, conversations, max_length, truncation, batch_stats)
    assert batched == reference
    assert batch_stats == reference_stats
    assert [tokenize_messages(tok, m, max_length, truncation) for m in conversations[:5]] == reference[:5]


@pytest.mark.parametrize("max_length,truncation", [(512, "truncate"), (24, "truncate"), (24, "drop")])
def test_batch_equals_per_sample_on_random_conversations(tokenizer, max_length, truncation):
    assert_batch_equals_per_sample(tokenizer, random_conversations(60), max_length, truncation)


@pytest.mark.parametrize("template", [
    # Llama-3 style headers, content trimmed by the template
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n\n{{ m['content'] | trim }}<|im_end|>{% endfor %}",
    # no end-of-turn marker: the prefix-rendering fallback
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}",
])
def test_batch_equals_per_sample_on_other_templates(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    assert_batch_equals_per_sample(tok, random_conversations(30, seed=1), 512, "truncate")


@pytest.mark.parametrize("name", ["qwen2.5-instruct", "llama-3-instruct", "mistral-7b-instruct-v0.3", "llama-2-chat"])
def test_batch_equals_per_sample_on_real_tokenizers(name):
    from transformers import AutoTokenizer

    from qlaunch.data.templates import ensure_chat_template

    path = os.path.join(MODELS, name)
    if not os.path.isdir(path):
        pytest.skip(f"{path} not present")
    tok = AutoTokenizer.from_pretrained(path)
    ensure_chat_template(tok)
    conversations = random_conversations(40, seed=2)
    if name in ("mistral-7b-instruct-v0.3", "llama-2-chat"):  # their templates insist on user/assistant turns
        conversations = [m for m in conversations if m[0]["role"] != "system"] + [
            [m for m in c if m["role"] != "system"] for c in conversations[:10]]
    assert_batch_equals_per_sample(tok, conversations, 4096, "truncate")
    assert_batch_equals_per_sample(tok, conversations, 40, "truncate")


def test_template_error_in_a_batch_names_the_problem(tokenizer):
    from qlaunch.config.errors import UsageError

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}{% if m['content'] == 'bad' %}{{ raise_exception('no bad') }}{% endif %}" \
                        "{{ m['content'] }}<|im_end|>{% endfor %}"
    good = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    bad = [{"role": "user", "content": "bad"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(UsageError, match="the chat template refused a conversation: no bad"):
        tokenize_batch(tok, [good, bad, good], 512)


def test_bisect_labels_equal_the_token_scan_on_any_offsets():
    rng = random.Random(0)
    for trial in range(3000):
        n = rng.randint(0, 12)
        offsets, at = [], 0
        for _ in range(n):
            at += rng.choice((0, 0, 1, 2))
            width = rng.choice((0, 1, 1, 2, 3)) if trial % 3 else rng.choice((1, 2))  # empty tokens in 2 of 3
            offsets.append((at, at + width))
            if trial % 5 == 0 and rng.random() < 0.2:  # offsets that go back
                at = max(0, at - 2)
        spans, pos = [], 0
        for _ in range(rng.randint(0, 3)):
            start = pos + rng.randint(0, 3)
            end = start + rng.randint(0 if trial % 7 == 0 else 1, 4)
            spans.append((start, end))
            pos = end
        ids = list(range(100, 100 + n))
        assert labels_by_bisect(ids, offsets, spans) == labels_by_scan(ids, offsets, spans), (offsets, spans)
