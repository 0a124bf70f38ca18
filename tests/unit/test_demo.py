"""The demo is deterministic, built locally, and its eval set is held out."""
import hashlib
import json
import os

from qlaunch.demo import build_demo


def digest(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def test_demo_is_byte_identical_across_builds(tmp_path, demo):
    build_demo(str(tmp_path / "again"))
    assert digest(tmp_path / "again") == digest(os.path.dirname(demo["model"]))


def test_demo_layout_and_held_out_eval(demo):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(demo["model"])
    assert config.model_type == "llama" and config.num_hidden_layers == 2
    train, evals = json.load(open(demo["train"])), json.load(open(demo["eval"]))
    assert len(train) == 200 and len(evals) == 40
    prompts = lambda rows: {r["conversations"][0]["value"] for r in rows}  # noqa: E731
    assert not prompts(train) & prompts(evals)
    assert all(r["conversations"][1]["from"] == "assistant" for r in train + evals)


def test_demo_tokenizer_has_chat_template_and_special_tokens(tokenizer):
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert len(tokenizer("<|im_start|>", add_special_tokens=False)["input_ids"]) == 1
