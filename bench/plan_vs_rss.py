"""The memory plan against measured peak RSS of real CPU training runs.

    python bench/plan_vs_rss.py [--quick]

Each run is `finetune.py` in its own process (so ru_maxrss is its own) for 2 steps, fp32 on CPU,
rows truncated to exactly the planned length; metrics.json holds the measured peak RSS beside the
plan's estimate (the same `python -m qlaunch.plan` model, planned for this CPU). Models: the demo
model (NF4 Q-LoRA, its recipe) and a ~100M-parameter random Llama (LoRA r64, and NF4 Q-LoRA), at
several lengths, with and without activation checkpointing.

Every case runs twice. The plan counts live memory; peak RSS equals it only when freed memory goes
back to the OS. glibc's malloc raises its mmap threshold each time a large block is freed (up to
32 MiB), so later activations come from the heap and what they free stays in the process:
  returned   MALLOC_MMAP_THRESHOLD_=131072 (fixed threshold: every block >= 128 KiB is mmapped
             and unmapped when freed) — peak RSS is the peak of live memory; this is the comparison
  glibc      glibc's default — what a plain CPU run shows (more, and more so for longer rows)
Prints a table with both ratios, writes bench/results/plan_vs_rss.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))  # random_llama, also when loaded by file path (tests)

RANDOM_100M = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                   num_key_value_heads=12)


def long_records(n: int, chars: int, seed: int = 0) -> list[dict]:
    """Alpaca records whose answers tokenize past `chars` / 4 tokens: truncation cuts every row to the length."""
    rng = random.Random(seed)
    words = ["hot", "cold", "up", "down", "big", "small", "fast", "slow", "light", "dark", "open", "closed"]
    return [{"instruction": "Say the opposites.", "input": "",
             "output": " ".join(rng.choice(words) for _ in range(chars // 4))} for _ in range(n)]


def build_models(root: str) -> dict:
    from random_llama import random_llama

    big, demo = random_llama(root, "random-100M", RANDOM_100M)
    return {"demo": demo["model"], "random-100M": big}


RETURNED = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # glibc: fixed threshold, freed blocks unmapped


def run(model: str, data: str, out: str, length: int, extra: list[str], returned: bool = True) -> dict:
    argv = [sys.executable, os.path.join(REPO, "finetune.py"), "--model_name_or_path", model, "--data_path", data,
            "--output_dir", out, "--model_max_length", str(length), "--max_steps", "2", "--logging_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--per_device_train_batch_size", "1",
            "--learning_rate", "1e-4", "--lora_dropout", "0.05", *extra]
    env = {k: v for k, v in os.environ.items() if k not in RETURNED}
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env={**env, **(RETURNED if returned else {})})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    run_metrics = metrics.get("run", metrics)
    return {"measured_gib": run_metrics["peak_memory_gib"], "planned_gib": run_metrics["plan_estimate_gib"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="the demo model and two lengths of the 100M model")
    p.add_argument("--root", default=os.path.join(REPO, "bench", "results", "plan_vs_rss"))
    args = p.parse_args(argv)
    os.makedirs(args.root, exist_ok=True)
    models = build_models(args.root)
    cases = [("demo", "nf4 q-lora (demo recipe)", 128, ["--config", "recipes/demo-qlora.yaml"]),
             ("demo", "lora, checkpointing", 512, ["--use_lora", "--activation_checkpointing", "True"])]
    lengths = (256, 1024) if args.quick else (256, 512, 1024, 2048)
    for length in lengths:
        cases.append(("random-100M", "lora r64", length, ["--use_lora", "--lora_r", "64"]))
        cases.append(("random-100M", "lora r64, checkpointing", length,
                      ["--use_lora", "--lora_r", "64", "--activation_checkpointing", "True"]))
    if not args.quick:
        cases.append(("random-100M", "nf4 q-lora, checkpointing", 1024,
                      ["--q_lora", "--quantization", "nf4", "--activation_checkpointing", "True"]))
    rows = []
    print(f"{'model':12} {'setting':28} {'length':>6} {'planned':>8} {'returned':>9} {'ratio':>6} {'glibc':>7} "
          f"{'ratio':>6}")
    for name, setting, length, extra in cases:
        data = os.path.join(args.root, f"long-{length}.json")
        with open(data, "w") as f:
            json.dump(long_records(8, 6 * length), f)
        out = os.path.join(args.root, f"run-{name}-{length}-{len(rows)}")
        extra = [e if not e.startswith("recipes/") else os.path.join(REPO, e) for e in extra]
        returned = run(models[name], data, out + "-returned", length, extra, returned=True)
        glibc = run(models[name], data, out + "-glibc", length, extra, returned=False)
        planned = returned["planned_gib"]
        row = {"model": name, "setting": setting, "length": length, "planned_gib": planned,
               "measured_gib": returned["measured_gib"], "ratio": planned / returned["measured_gib"],
               "measured_glibc_default_gib": glibc["measured_gib"], "ratio_glibc_default": planned / glibc["measured_gib"]}
        rows.append(row)
        print(f"{name:12} {setting:28} {length:6d} {planned:7.2f}G {row['measured_gib']:8.2f}G {row['ratio']:6.2f} "
              f"{glibc['measured_gib']:6.2f}G {row['ratio_glibc_default']:6.2f}", flush=True)
    os.makedirs(os.path.join(REPO, "bench", "results"), exist_ok=True)
    with open(os.path.join(REPO, "bench", "results", "plan_vs_rss.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
