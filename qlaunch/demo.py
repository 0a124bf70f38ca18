"""A deterministic tiny chat model, tokenizer and dataset, built locally with nothing downloaded.

    python -m qlaunch.demo --out DIR        # DIR/model, DIR/data/train.json, DIR/data/eval.json

The model is a randomly initialised Llama-architecture decoder (fixed seed) with a byte-level
BPE tokenizer trained on the demo corpus and a ChatML chat template. The task — answer with
the opposite of a word, asked in varied phrasings — is one a tiny model visibly learns in a
few minutes on a CPU; the eval set holds (word, phrasing) pairs never seen in training.
"""
from __future__ import annotations

import argparse
import json
import os
import random

import torch

SEED = 1234
PAIRS = [
    ("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("day", "night"),
    ("open", "closed"), ("happy", "sad"), ("light", "dark"), ("early", "late"), ("full", "empty"),
    ("hard", "soft"), ("young", "old"), ("rich", "poor"), ("strong", "weak"), ("wet", "dry"),
    ("loud", "quiet"), ("clean", "dirty"), ("near", "far"), ("high", "low"), ("thick", "thin"),
]
QUESTIONS = [
    "What is the opposite of {w}?",
    "Opposite of {w}?",
    "Tell me the opposite of {w}.",
    "Give the opposite of the word {w}.",
    "Which word means the opposite of {w}?",
    "{w}: what is its opposite?",
]
SYSTEM = "You are a helpful assistant."
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_samples(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """All (word, question) combinations; a fixed sixth of them held out for evaluation."""
    rng = random.Random(seed)
    words = [(a, b) for a, b in PAIRS] + [(b, a) for a, b in PAIRS]
    combos = [(w, answer, q) for w, answer in words for q in range(len(QUESTIONS))]
    rng.shuffle(combos)
    n_eval = len(combos) // 6
    samples = []
    for i, (w, answer, q) in enumerate(combos):
        samples.append({
            "id": f"opposite-{i}",
            "conversations": [
                {"from": "user", "value": QUESTIONS[q].format(w=w)},
                {"from": "assistant", "value": f"The opposite of {w} is {answer}."},
            ],
        })
    return samples[n_eval:], samples[:n_eval]


def build_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        chat_template=CHATML,
        model_max_length=512,
    )


def build_model(vocab_size: int, pad_id: int, eos_id: int, seed: int = SEED):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.1,  # large enough that a frozen random lm_head can express confident answers
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def build_demo(out: str, seed: int = SEED) -> dict:
    """Write DIR/model and DIR/data/{train,eval}.json; returns their paths."""
    train, evals = make_samples(seed)
    corpus = [SYSTEM] + [t["value"] for s in train + evals for t in s["conversations"]]
    corpus += ["user", "assistant", "system"]
    tokenizer = build_tokenizer(corpus * 4)
    model = build_model(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    model_dir = os.path.join(out, "model")
    data_dir = os.path.join(out, "data")
    os.makedirs(data_dir, exist_ok=True)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    paths = {"model": model_dir}
    for name, rows in (("train", train), ("eval", evals)):
        paths[name] = os.path.join(data_dir, f"{name}.json")
        with open(paths[name], "w") as f:
            json.dump(rows, f, indent=1)
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qlaunch.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to write model/ and data/ into")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    paths = build_demo(args.out, args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
