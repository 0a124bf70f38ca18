"""Evaluate a base model, or a base + adapter, on held-out chat samples.

    python -m qlaunch.evaluate --base DIR/model [--adapter OUT] --data eval.json [--json result.json]

Reports the eval loss (assistant tokens only, as in training) and exact match: the greedy
reply to each sample's last user turn equals its reference assistant reply.
"""
from __future__ import annotations

import json
import math
import sys

import torch

from qlaunch.config.domains import EVALUATE, CommandParser
from qlaunch.config.errors import UsageError
from qlaunch.data.formats import load_samples
from qlaunch.data.labels import IGNORE_INDEX
from qlaunch.data.tokenize import tokenize_messages
from qlaunch.model.inference import reply


@torch.no_grad()
def eval_loss(model, tokenizer, samples, max_length: int = 512) -> float:
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for messages in samples:
        item = tokenize_messages(tokenizer, messages, max_length)
        if item is None:
            continue
        ids = torch.tensor([item["input_ids"]], device=device)
        labels = torch.tensor([item["labels"]], device=device)
        logits = model(input_ids=ids).logits.float()
        shift_logits, shift_labels = logits[0, :-1], labels[0, 1:]
        mask = shift_labels != IGNORE_INDEX
        loss = torch.nn.functional.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="sum")
        total += loss.item()
        count += int(mask.sum())
    return total / max(count, 1)


def exact_match(model, tokenizer, samples, limit: int | None = None) -> tuple[float, list[dict]]:
    rows = []
    for messages in samples[:limit]:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        reference = messages[last]["content"].strip()
        answer = reply(model, tokenizer, messages[:last], max_new_tokens=32)
        rows.append({"prompt": messages[last - 1]["content"], "reference": reference, "reply": answer,
                     "match": answer == reference})
    return sum(r["match"] for r in rows) / max(len(rows), 1), rows


def evaluate(model, tokenizer, samples, limit: int | None = None) -> dict:
    loss = eval_loss(model, tokenizer, samples)
    em, rows = exact_match(model, tokenizer, samples, limit)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50)), "exact_match": em, "samples": rows}


def compare(before_path: str, after_path: str) -> str:
    """A before/after table of two --json results."""
    with open(before_path) as f:
        before = json.load(f)
    with open(after_path) as f:
        after = json.load(f)
    n = len(after["samples"])
    lines = [
        f"{'':24}{'before':>12}{'after':>12}",
        f"{'eval loss':24}{before['eval_loss']:>12.4f}{after['eval_loss']:>12.4f}",
        f"{'exact match (held-out)':24}{before['exact_match']:>12.1%}{after['exact_match']:>12.1%}   ({n} samples)",
    ]
    verdict = "learned" if after["eval_loss"] < before["eval_loss"] and after["exact_match"] > before["exact_match"] \
        else "did NOT improve"
    lines.append(f"The fine-tuned adapter {verdict}.")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = CommandParser("qlaunch.evaluate", EVALUATE, description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="base model (default: the adapter's base)")
    parser.add_argument("--adapter", help="adapter directory (a LoRA run's output_dir)")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE.json", "AFTER.json"),
                        help="print a before/after table of two --json results and exit")
    parser.add_argument("--data", help="held-out samples (.json / .jsonl, any supported format)")
    parser.add_argument("--limit", type=int, default=None, help="generate for at most this many samples")
    parser.add_argument("--system_message", default="You are a helpful assistant.")
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="run code shipped with the base checkpoint (needed when training needed it)")
    parser.add_argument("--show", type=int, default=3, help="print this many sample replies")
    args = parser.parse_args(argv)
    if args.compare:
        print(compare(*args.compare))
        return
    if not args.data:
        parser.error("--data is required")
    try:
        from qlaunch.model.inference import load_for_inference

        samples = load_samples(args.data, args.system_message)
        model, tokenizer = load_for_inference(args.base, args.adapter, trust_remote_code=args.trust_remote_code)
    except UsageError as e:
        print(e.render("qlaunch.evaluate"), file=sys.stderr)
        sys.exit(2)
    result = evaluate(model, tokenizer, samples, args.limit)
    label = f"adapter {args.adapter}" if args.adapter else f"base {args.base}"
    print(f"{label}: eval_loss {result['eval_loss']:.4f}  exact_match {result['exact_match']:.1%} "
          f"({sum(r['match'] for r in result['samples'])}/{len(result['samples'])})")
    for row in result["samples"][: args.show]:
        print(f"  Q: {row['prompt']}\n  A: {row['reply']!r}  (expected {row['reference']!r})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
