"""A million conversations: the first build and its packing plan against tokenizing alone, and how fast a
second run (one process, then two under torchrun) reaches its first training step.

    python bench/million.py [--samples 1000000] [--max_length 1024] [--work DIR] [--keep]

Data: a seeded synthetic Qwen-format .jsonl (`{"id", "conversations": [{"from", "value"}]}`), 1-5
exchanges, replies of a log-normal number of sentences (median 3, a long tail past --max_length),
a system prompt in 20% of the records. Tokenizer: Qwen2.5-Instruct's (../shared/models) when there,
else the demo model's; the model a 1-layer random Qwen2 with that tokenizer (startup is what is timed).
Rows, each in its own process:
  encode_only      the fast tokenizer on the conversations' rendered texts, offsets included (rendered
                   beforehand, not timed): the floor any tokenization pays
  tokenize_alone   qlaunch's tokenization (data.tokenize.encode_conversations: render, tokenize, labels),
                   nothing read or written
                   (both on as many forked processes as the build uses, on the records already in memory)
  first_build      build_dataset into an empty --cache_dir (read, tokenize, write Arrow, verify)
  packing_plan     the packing plan of the built rows (first-fit-decreasing, written into the entry)
  group_by_length  the lengths from the cache and one epoch's LengthGroupedSampler order
  second_run       finetune.py --packing, cache built: seconds from process start to the first training
                   step (metrics.json startup_seconds_per_rank)
  torchrun_2       the same under torchrun, 2 processes: each rank's seconds to the first step
Targets (issue 23): first build + packing plan <= 3x tokenizing alone; packing plan < 30 s; second run
<= 15 s to its first step; the second rank no slower than the first. Prints a table, writes JSON.
Run it with nothing else on the machine.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import socket
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
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, REPO)

from bench.tokenization import QWEN, SYSTEM, WORDS  # noqa: E402 - the same words and system prompt

TARGETS = {"build_vs_tokenize": 3.0, "plan_seconds": 30.0, "second_run_seconds": 15.0}


def write_data(path: str, n: int, seed: int = 0) -> None:
    """n records from a pool of sentences (generating each word anew would take minutes at 1M)."""
    rng = random.Random(seed)
    pool = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))).capitalize() + rng.choice(".?!")
            for _ in range(20000)]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            turns = []
            for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4, 5))):
                turns.append({"from": "user", "value": " ".join(rng.choices(pool, k=rng.randint(1, 3)))})
                sentences = min(max(1, int(rng.lognormvariate(1.1, 0.9))), 80)
                turns.append({"from": "assistant", "value": " ".join(rng.choices(pool, k=sentences))})
            record = {"id": str(i), "conversations": turns}
            if rng.random() < 0.2:
                record["system"] = rng.choice(pool)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_model(work: str) -> tuple[str, str]:
    """A 1-layer random Qwen2 with the bench's tokenizer: (model dir, tokenizer name)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    if os.path.isdir(QWEN):
        source, name = QWEN, "qwen2.5-instruct"
    else:
        from qlaunch.demo import build_demo

        source, name = build_demo(os.path.join(work, "demo"))["model"], "demo"
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    model_dir = os.path.join(work, "model")
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, name


# ---- rows that run in a worker process ------------------------------------------------------------
_SHARED = {}


def _encode_shard(bounds: tuple[int, int]) -> tuple[float, float, int]:
    """(seconds in the fast tokenizer, seconds in encode_conversations, tokens) of one forked worker's slice."""
    from qlaunch.data.templates import render_batch
    from qlaunch.data.tokenize import encode_conversations

    tokenizer, conversations = _SHARED["tokenizer"], _SHARED["conversations"][bounds[0]:bounds[1]]
    encode = tokenize = 0.0
    tokens = 0
    for start in range(0, len(conversations), 1000):
        batch = conversations[start:start + 1000]
        texts = render_batch(tokenizer, batch)
        t0 = time.perf_counter()
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        encode += time.perf_counter() - t0
        tokens += sum(len(ids) for ids in encoded["input_ids"])
        t0 = time.perf_counter()
        encode_conversations(tokenizer, batch)
        tokenize += time.perf_counter() - t0
    return encode, tokenize, tokens


def tokenize_rows(args) -> list[dict]:
    """encode_only and tokenize_alone: forked workers over the records already in memory; a row's time is
    its slowest worker's (they run side by side, as the build's do)."""
    from qlaunch.data.cache import default_num_proc
    from qlaunch.data.formats import load_samples
    from qlaunch.model.load import load_tokenizer

    _SHARED["tokenizer"] = load_tokenizer(os.path.join(args.work, "model"))
    _SHARED["conversations"] = conversations = load_samples(os.path.join(args.work, "data.jsonl"), SYSTEM)
    procs = default_num_proc(len(conversations))
    step = -(-len(conversations) // procs)
    shards = [(i, min(i + step, len(conversations))) for i in range(0, len(conversations), step)]
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        results = pool.map(_encode_shard, shards)
    tokens = sum(r[2] for r in results)
    return [{"row": "encode_only", "seconds": max(r[0] for r in results), "processes": procs, "tokens": tokens},
            {"row": "tokenize_alone", "seconds": max(r[1] for r in results), "processes": procs, "tokens": tokens}]


def build_rows(args) -> list[dict]:
    """first_build, packing_plan and group_by_length, in one process (the plan reads the built rows)."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from qlaunch.data.dataset import build_dataset
    from qlaunch.data.packing import PackedDataset
    from qlaunch.model.load import load_tokenizer

    tokenizer = load_tokenizer(os.path.join(args.work, "model"))
    start = time.perf_counter()
    data = build_dataset(os.path.join(args.work, "data.jsonl"), tokenizer, max_length=args.max_length,
                         system_message=SYSTEM, cache_dir=os.path.join(args.work, "cache"), show_progress=False)
    build = time.perf_counter() - start
    start = time.perf_counter()
    packed = PackedDataset(data, args.max_length, data.cache_entry)
    plan = time.perf_counter() - start
    start = time.perf_counter()
    lengths = data.lengths
    read = time.perf_counter() - start
    torch.manual_seed(0)
    start = time.perf_counter()
    order = list(LengthGroupedSampler(8, lengths=lengths))
    group = time.perf_counter() - start
    assert sorted(order[:10]) == sorted(set(order[:10]))
    return [{"row": "first_build", "seconds": build, "samples": data.stats.samples, "kept": len(data),
             "tokens": data.stats.tokens, "stats": data.stats.summary(args.max_length)},
            {"row": "packing_plan", "seconds": plan, "rows": len(packed), "fill": packed.fill},
            {"row": "group_by_length", "seconds": read + group, "lengths_seconds": read, "order_seconds": group}]


def finetune_cmd(args, out: str, nproc: int) -> list[str]:
    flags = ["--model_name_or_path", os.path.join(args.work, "model"),
             "--data_path", os.path.join(args.work, "data.jsonl"), "--cache_dir", os.path.join(args.work, "cache"),
             "--model_max_length", str(args.max_length), "--packing", "True", "--use_lora",
             "--per_device_train_batch_size", "1", "--max_steps", "1", "--save_strategy", "no",
             "--report_to", "none", "--disable_tqdm", "True", "--output_dir", out]
    if nproc == 1:
        return [sys.executable, os.path.join(REPO, "finetune.py"), *flags]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(port), os.path.join(REPO, "finetune.py"), *flags]


def run_row(args, row: str, nproc: int) -> dict:
    out = os.path.join(args.work, f"out-{row}")
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run(finetune_cmd(args, out, nproc), capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{row} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    with open(os.path.join(out, "metrics.json")) as f:
        ranks = json.load(f)["startup_seconds_per_rank"]
    return {"row": row, "seconds": max(ranks), "startup_seconds_per_rank": ranks, "command_seconds": wall,
            "log": [line for line in done.stderr.splitlines() if "[qlaunch" in line][:40]}


def worker(args) -> None:
    rows = tokenize_rows(args) if args.worker == "tokenize" else build_rows(args)
    print(json.dumps(rows))


def spawn(args, what: str) -> list[dict]:
    cmd = [sys.executable, __file__, "--worker", what, "--work", args.work, "--max_length", str(args.max_length)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if done.returncode != 0:
        sys.exit(f"{what} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--work", default=None, help="working directory (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (data, model, cache)")
    parser.add_argument("--json", default=os.path.join(REPO, "bench", "results", "million.json"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    args.work = args.work or tempfile.mkdtemp(prefix="qlaunch-bench-million-")
    os.makedirs(args.work, exist_ok=True)
    shutil.rmtree(os.path.join(args.work, "cache"), ignore_errors=True)  # the first build is measured
    data = os.path.join(args.work, "data.jsonl")
    start = time.perf_counter()
    write_data(data, args.samples)
    generated = time.perf_counter() - start
    model_dir, tokenizer = write_model(args.work)
    print(f"{args.samples} conversations ({os.path.getsize(data) / 1e9:.2f} GB, written in {generated:.0f} s), "
          f"tokenizer {tokenizer}, max length {args.max_length}, work {args.work}", flush=True)

    rows = spawn(args, "tokenize") + spawn(args, "build")
    rows += [run_row(args, "second_run", 1), run_row(args, "torchrun_2", 2)]
    by = {r["row"]: r for r in rows}
    ranks = by["torchrun_2"]["startup_seconds_per_rank"]
    summary = {
        "build_plus_plan_vs_tokenize_alone": (by["first_build"]["seconds"] + by["packing_plan"]["seconds"])
        / by["tokenize_alone"]["seconds"],
        "build_plus_plan_vs_encode_only": (by["first_build"]["seconds"] + by["packing_plan"]["seconds"])
        / by["encode_only"]["seconds"],
        "plan_seconds": by["packing_plan"]["seconds"],
        "second_run_seconds": by["second_run"]["seconds"],
        "rank1_vs_rank0": ranks[1] / ranks[0],
    }
    met = {"build_vs_tokenize": summary["build_plus_plan_vs_tokenize_alone"] <= TARGETS["build_vs_tokenize"],
           "plan_seconds": summary["plan_seconds"] < TARGETS["plan_seconds"],
           "second_run_seconds": summary["second_run_seconds"] <= TARGETS["second_run_seconds"],
           "rank1_not_slower": ranks[1] <= ranks[0]}
    print(f"{'row':16} {'seconds':>9}  notes")
    for r in rows:
        note = {"encode_only": f"{r.get('tokens', 0) / r['seconds'] / 1e6:.2f}M tokens/s, {r.get('processes')} processes",
                "tokenize_alone": f"{args.samples / r['seconds']:,.0f} conversations/s",
                "first_build": f"{args.samples / r['seconds']:,.0f} conversations/s; {r.get('stats', '')}",
                "packing_plan": f"{r.get('rows', 0):,} rows, {100 * r.get('fill', 0):.1f}% of capacity used",
                "group_by_length": f"lengths {r.get('lengths_seconds', 0):.2f} s + one epoch's order "
                                   f"{r.get('order_seconds', 0):.2f} s",
                "second_run": f"process start to first step; whole command {r.get('command_seconds', 0):.1f} s",
                "torchrun_2": f"ranks {', '.join(f'{s:.1f}' for s in ranks)} s; whole command "
                              f"{r.get('command_seconds', 0):.1f} s"}[r["row"]]
        print(f"{r['row']:16} {r['seconds']:>9.2f}  {note}")
    print(f"first build + plan = {summary['build_plus_plan_vs_tokenize_alone']:.2f}x tokenizing alone "
          f"(target <= 3: {'met' if met['build_vs_tokenize'] else 'NOT met'}), "
          f"{summary['build_plus_plan_vs_encode_only']:.2f}x the tokenizer alone; plan {summary['plan_seconds']:.1f} s "
          f"(< 30: {'met' if met['plan_seconds'] else 'NOT met'}); second run {summary['second_run_seconds']:.1f} s "
          f"(<= 15: {'met' if met['second_run_seconds'] else 'NOT met'}); rank 1 / rank 0 "
          f"{summary['rank1_vs_rank0']:.2f} ({'met' if met['rank1_not_slower'] else 'NOT met'})")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"benchmark": "million", "samples": args.samples, "max_length": args.max_length,
                   "tokenizer": tokenizer, "cpus": len(os.sched_getaffinity(0)), "rows": rows,
                   "summary": summary, "targets": TARGETS, "met": met}, f, indent=2)
    print(f"wrote {args.json}")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
