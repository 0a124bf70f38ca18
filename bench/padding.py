"""Dynamic padding vs padding every sample to model_max_length (what Qwen's finetune.py does).

    python bench/padding.py [--max_length 512] [--steps 20] [--json bench/results/padding.json]

Trains the demo model with LoRA for the same steps both ways and reports tokens per batch,
the padding fraction and seconds per step. Labels are identical; only wasted compute differs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from qlaunch.data.dataset import build_dataset  # noqa: E402
from qlaunch.demo import build_demo  # noqa: E402
from qlaunch.model.load import load_tokenizer
from qlaunch.train.trainer import make_collator


def measure(model, batches, steps: int) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    start = time.perf_counter()
    for i in range(steps):
        batch = batches[i % len(batches)]
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", default="bench/results/padding.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    demo = build_demo(tempfile.mkdtemp())
    tokenizer = load_tokenizer(demo["model"])
    data = build_dataset(demo["train"], tokenizer, max_length=args.max_length, system_message="You are a helpful "
                         "assistant.", show_progress=False)
    items = [data[i] for i in range(len(data))]
    chunks = [items[i:i + args.batch_size] for i in range(0, len(items), args.batch_size)]
    dynamic = make_collator(tokenizer, on_gpu=False)
    rows = []
    for mode in ("dynamic", "max_length"):
        if mode == "dynamic":
            batches = [dynamic(c) for c in chunks]
        else:  # Qwen: every sample padded to model_max_length
            from transformers import DataCollatorForSeq2Seq

            fixed = DataCollatorForSeq2Seq(tokenizer, padding="max_length", max_length=args.max_length,
                                           label_pad_token_id=-100)
            batches = [fixed(c) for c in chunks]
        tokens = sum(b["input_ids"].numel() for b in batches)
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(demo["model"]),
                               LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
        seconds = measure(model, batches, args.steps)
        rows.append({"mode": mode, "tokens_per_batch": tokens / len(batches), "padding_fraction": 1 - real / tokens,
                     "seconds_per_step": seconds})
    print(f"{'padding':12} {'tokens/batch':>13} {'padding %':>10} {'s/step':>8}")
    for r in rows:
        print(f"{r['mode']:12} {r['tokens_per_batch']:>13.0f} {100 * r['padding_fraction']:>9.1f}% "
              f"{r['seconds_per_step']:>8.3f}")
    speedup = rows[1]["seconds_per_step"] / rows[0]["seconds_per_step"]
    print(f"dynamic padding is {speedup:.1f}x faster per step at model_max_length {args.max_length}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"benchmark": "padding", "max_length": args.max_length, "batch_size": args.batch_size,
                   "rows": rows, "speedup": speedup}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
