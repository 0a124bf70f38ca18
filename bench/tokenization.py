"""Tokenizing a large chat file: qlaunch's former per-sample path, the first (cache-building) run, a cached run.

    python bench/tokenization.py [--samples 100000] [--max_length 2048] [--tokenizer DIR] [--num_proc N]

The data is a seeded synthetic Qwen-format file (`{"id", "conversations": [{"from", "value"}]}`)
of multi-turn conversations: 1-4 user/assistant exchanges, replies of 1-4 sentences, a record's
own system prompt in one of five. The tokenizer is Qwen2.5-Instruct's (../shared/models) when it
is there, else the demo model's. Rows, each in its own process (so peak RSS is its own; workers a
build forks are counted too):
  per_sample   what qlaunch did before the cache: one template render pair and one tokenizer call
               per conversation, token-by-token label scan (tokenize.tokenize_messages_per_sample)
  first_build  build_dataset with an empty --cache_dir: datasets.map over batches, written to Arrow
  cached       the same call again: the entry is found, checked and memory-mapped
Timed: the build_dataset call (reading the file, tokenizing, writing / loading the cache), after
imports and the tokenizer load, which every row pays alike. Prints a table, writes JSON.
The machine is shared and noisy: read the ratios within one run.
"""
from __future__ import annotations

# Not bench/tokenize.py: scripts run with bench/ first on sys.path, and a tokenize.py there would
# shadow the standard library module that inspect and linecache import.
import argparse
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]  # no shadowing in this process
    sys.path.insert(0, REPO)

ROWS = ("per_sample", "first_build", "cached")
QWEN = os.path.join(os.path.dirname(REPO), "shared", "models", "qwen2.5-instruct")
SYSTEM = "You are a helpful assistant."
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by word "
         "but not what all were we when your can said there use an each which she do how their if will up other about "
         "out many then them these so some her would make like him into time has look two more write go see number no "
         "way could people my than first water been call who oil its now find long down day did get come made may part "
         "model train loss token cache arrow batch 12 345 6789 naïve café 数据 模型").split()


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + rng.choice(".?!")


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        turns = []
        for _ in range(rng.choice((1, 1, 2, 2, 3, 4))):
            turns.append({"from": "user", "value": _sentence(rng, 4, 30)})
            turns.append({"from": "assistant", "value": " ".join(_sentence(rng, 4, 25)
                                                                 for _ in range(rng.randint(1, 4)))})
        record = {"id": str(i), "conversations": turns}
        if rng.random() < 0.2:
            record["system"] = _sentence(rng, 3, 12)
        records.append(record)
    return records


def per_sample_dataset(path: str, tokenizer, max_length: int):
    """qlaunch's build_dataset before the cache: every conversation on its own."""
    from qlaunch.data.dataset import TokenizedDataset
    from qlaunch.data.formats import load_samples
    from qlaunch.data.tokenize import TokenizeStats, tokenize_messages_per_sample

    stats, items = TokenizeStats(), []
    for messages in load_samples(path, SYSTEM):
        item = tokenize_messages_per_sample(tokenizer, messages, max_length, "truncate", stats)
        if item is not None:
            items.append(item)
    return TokenizedDataset(items, stats)


def load_tokenizer(args):
    from qlaunch.model.load import load_tokenizer as load

    if args.tokenizer:
        return load(args.tokenizer), args.tokenizer
    if os.path.isdir(QWEN):
        return load(QWEN), "qwen2.5-instruct"
    from qlaunch.demo import build_demo

    return load(build_demo(os.path.join(args.work, "demo"))["model"]), "demo"


def worker(row: str, args) -> dict:
    import datasets  # noqa: F401 - imported before the clock starts in every row, like transformers

    from qlaunch.data.dataset import build_dataset

    tokenizer, name = load_tokenizer(args)
    path = os.path.join(args.work, "data.jsonl")
    start = time.perf_counter()
    if row == "per_sample":
        data = per_sample_dataset(path, tokenizer, args.max_length)
    else:
        data = build_dataset(path, tokenizer, max_length=args.max_length, system_message=SYSTEM,
                             cache_dir=os.path.join(args.work, "cache"), show_progress=False,
                             num_proc=args.num_proc)
    seconds = time.perf_counter() - start
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    probe = [data[i] for i in range(0, len(data), max(1, len(data) // 50))]
    return {"row": row, "tokenizer": name, "samples": data.stats.samples, "kept": len(data), "seconds": seconds,
            "samples_per_second": data.stats.samples / seconds, "peak_rss_mib": rss / 1024,
            "stats": data.stats.summary(args.max_length),
            "probe_digest": hashlib.sha256(json.dumps(probe).encode()).hexdigest()[:16]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: Qwen2.5's, else the demo's)")
    parser.add_argument("--num_proc", type=int, default=None, help="build workers (default: by size and CPUs)")
    parser.add_argument("--json", default=os.path.join(REPO, "bench", "results", "tokenization.json"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    work = tempfile.mkdtemp(prefix="qlaunch-bench-tokenize-")
    with open(os.path.join(work, "data.jsonl"), "w", encoding="utf-8") as f:
        for record in synthetic_records(args.samples, args.seed):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    rows = []
    for row in ROWS:
        cmd = [sys.executable, __file__, "--worker", row, "--work", work, "--samples", str(args.samples),
               "--max_length", str(args.max_length)]
        cmd += ["--tokenizer", args.tokenizer] if args.tokenizer else []
        cmd += ["--num_proc", str(args.num_proc)] if args.num_proc is not None else []
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if out.returncode != 0:
            sys.exit(f"{row} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    by = {r["row"]: r for r in rows}
    same = len({(r["stats"], r["probe_digest"]) for r in rows}) == 1
    print(f"{args.samples} synthetic multi-turn conversations, tokenizer {rows[0]['tokenizer']}, "
          f"max length {args.max_length}")
    print(f"{'row':12} {'seconds':>9} {'samples/s':>11} {'peak RSS':>10}")
    for r in rows:
        print(f"{r['row']:12} {r['seconds']:>9.2f} {r['samples_per_second']:>11.0f} {r['peak_rss_mib']:>7.0f}MiB")
    summary = {
        "first_build_vs_per_sample": by["first_build"]["samples_per_second"] / by["per_sample"]["samples_per_second"],
        "cached_vs_first_build": by["cached"]["samples_per_second"] / by["first_build"]["samples_per_second"],
        "cached_vs_per_sample": by["cached"]["samples_per_second"] / by["per_sample"]["samples_per_second"],
        "identical_results": same,
    }
    print(f"first build {summary['first_build_vs_per_sample']:.1f}x the per-sample path; cached run "
          f"{summary['cached_vs_first_build']:.0f}x the first build; statistics and sampled rows "
          f"{'identical' if same else 'DIFFER'} across rows ({rows[0]['stats']})")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"benchmark": "tokenize", "samples": args.samples, "max_length": args.max_length,
                   "cpus": len(os.sched_getaffinity(0)), "rows": rows, "summary": summary}, f, indent=2)
    print(f"wrote {args.json}")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
