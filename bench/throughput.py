"""Training throughput by batching mode on a long-tailed chat set.

    python bench/throughput.py [--max_length 512] [--batch_size 4] [--steps 12] [--quick]
    python bench/throughput.py --compile [--compile_steps 200]   # the table, then the compiled rows

Modes: pad_to_max (every sample padded to max_length: Qwen's finetune.py, written here), dynamic
(qlaunch's default: each batch padded to its longest sample), group_by_length (transformers'
length-grouped order, then dynamic padding), packing (--packing True: rows of up to max_length,
samples isolated, --batch_size rows per step), packing_equal_samples (the same, with as many rows
per step as hold --batch_size samples on average: the unpacked modes' samples per optimizer step,
as one would set --per_device_train_batch_size when switching to packing); qlaunch's modes compute logits only at labelled positions, as its Trainer
does (--labelled_logits_only 0 to compare without). Models: the demo model and a ~20M-parameter random Qwen2-shaped model, LoRA r64
on every projection, fp32 on CPU. The data is a seeded synthetic set of token ids with a long tail
(log-normal lengths, median ~110 tokens, a tail past 512), the last ~40% of each sample trained.
Each (model, mode) runs in its own process, so peak RSS is its own. Prints a table, writes JSON.
Ratios within one run are what to read: this machine is shared and noisy.

--compile adds rows <mode>_compiled (packing and dynamic; the 20M model, the demo model with --quick): the
model under torch.compile (inductor, as --torch_compile compiles it, cold: an empty inductor cache) for
--compile_steps steps over shuffled epochs (the Trainer's order: each epoch reshuffled, its last batch
smaller), batches from the collator qlaunch builds for --torch_compile (collate.compile_padding; 0 with
--compile_padding 0), logits at every position (qlaunch turns --labelled_logits_only off under
--torch_compile). Their table columns count the steady steps only (no compile in them); the compile
table below adds the first step (the compile), the recompilations (count, reasons, seconds), the same
process's uncompiled steps on the same batches with every logit (eager), and the break-even step count.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODES = ("pad_to_max", "dynamic", "group_by_length", "packing", "packing_equal_samples")
MODELS = {"demo": None, "random-20M": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                                           num_attention_heads=6, num_key_value_heads=2, vocab_size=8192)}


def synthetic_items(n: int, vocab: int, max_length: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        length = min(max(int(rng.lognormvariate(4.7, 0.6)), 24), 900)  # median ~110, tail past 512
        length = min(length, max_length)  # truncated like --truncation truncate
        ids = [rng.randrange(4, vocab) for _ in range(length)]
        trained_from = int(length * 0.6)
        items.append({"input_ids": ids, "labels": [-100] * trained_from + ids[trained_from:]})
    return items


def batches_for(mode: str, items: list[dict], batch_size: int, max_length: int, pad_id: int):
    import torch

    from qlaunch.data.collate import PaddingCollator

    collate = PaddingCollator(pad_id)
    if mode == "pad_to_max":
        chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
        out = []
        for chunk in chunks:
            ids = torch.full((len(chunk), max_length), pad_id)
            labels = torch.full((len(chunk), max_length), -100)
            mask = torch.zeros((len(chunk), max_length), dtype=torch.long)
            for r, item in enumerate(chunk):
                n = len(item["input_ids"])
                ids[r, :n], labels[r, :n], mask[r, :n] = torch.tensor(item["input_ids"]), torch.tensor(item["labels"]), 1
            out.append(({"input_ids": ids, "labels": labels, "attention_mask": mask}, int(mask.sum())))
        return out
    if mode == "group_by_length":
        from transformers.trainer_pt_utils import get_length_grouped_indices

        order = get_length_grouped_indices([len(i["input_ids"]) for i in items], batch_size,
                                           generator=torch.Generator().manual_seed(0))
        items = [items[i] for i in order]
    if mode.startswith("packing"):
        from qlaunch.data.packing import PackedDataset

        packed = PackedDataset(items, max_length)
        if mode == "packing_equal_samples":  # as many samples per step as the unpacked modes' batch
            batch_size = max(1, round(batch_size * len(packed) / len(items)))
        items = [packed[i] for i in range(len(packed))]
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    return [(collate(c), sum(len(it["input_ids"]) for it in c)) for c in chunks]


def lora_model(model_name: str, work: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if MODELS[model_name] is None:
        from qlaunch.demo import build_demo

        demo = build_demo(os.path.join(work, "demo"))
        base = AutoModelForCausalLM.from_pretrained(demo["model"])
    else:
        base = AutoModelForCausalLM.from_config(Qwen2Config(**MODELS[model_name], max_position_embeddings=2048))
    base.config.use_cache = False
    return get_peft_model(base, LoraConfig(r=64, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))


def worker(model_name: str, mode: str, args) -> dict:
    import torch

    model = lora_model(model_name, args.work)
    vocab = model.config.vocab_size
    items = synthetic_items(args.samples, vocab, args.max_length)
    batches = batches_for(mode, items, args.batch_size, args.max_length, pad_id=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    steps = min(args.steps, len(batches))
    real = trained = total = 0
    start = time.perf_counter()
    from qlaunch.train.loss import labelled_positions

    for batch, real_tokens in batches[:steps]:
        if mode != "pad_to_max" and args.labelled_logits_only:  # what qlaunch's Trainer passes (qlaunch/train/loss.py)
            mask, targets = labelled_positions(batch["labels"])
            batch = {**batch, "logits_to_keep": mask, "shift_labels": targets}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total += batch["input_ids"].numel()
        real += real_tokens
        trained += int((batch["labels"][:, 1:] != -100).sum())
    seconds = time.perf_counter() - start
    return {"model": model_name, "mode": mode, "steps": steps, "seconds_per_step": seconds / steps,
            "rows_per_step": batches[0][0]["input_ids"].shape[0],
            "total_tokens": total, "real_tokens": real, "trained_tokens": trained,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def shuffled_batches(mode: str, items: list[dict], batch_size: int, max_length: int, steps: int, pad_id: int,
                     pad_to_multiple_of: int | None, seed: int = 0) -> list[tuple[dict, int]]:
    """`steps` batches over epochs in the Trainer's order: every epoch reshuffled, its last batch smaller."""
    from qlaunch.data.collate import PaddingCollator

    if mode == "packing":
        from qlaunch.data.packing import PackedDataset

        packed = PackedDataset(items, max_length)
        items = [packed[i] for i in range(len(packed))]
    collate = PaddingCollator(pad_id, pad_to_multiple_of=pad_to_multiple_of)
    rng, out = random.Random(seed), []
    while len(out) < steps:
        order = list(range(len(items)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            chunk = [items[i] for i in order[start:start + batch_size]]
            out.append((collate(chunk), sum(len(it["input_ids"]) for it in chunk)))
    return out[:steps]


def compiled_worker(model_name: str, mode: str, args) -> dict:
    """torch.compile'd LoRA steps (inductor) on the batches qlaunch's --torch_compile collator makes; then the
    same model uncompiled on the same batches, every logit computed in both (see the module docstring)."""
    import logging

    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    from qlaunch.data.collate import compile_padding

    reasons: list[str] = []

    class Recompiles(logging.Handler):  # dynamo logs each recompilation with the guard that failed
        def emit(self, record):
            reasons.append(record.getMessage())

    torch._logging.set_logs(recompiles=True)
    logging.getLogger("torch._dynamo.guards.__recompiles").addHandler(Recompiles())
    model = lora_model(model_name, args.work)
    multiple = compile_padding(True, mode == "packing", args.max_length) if args.compile_padding else None
    items = synthetic_items(args.samples, model.config.vocab_size, args.max_length)
    batches = shuffled_batches(mode, items, args.batch_size, args.max_length, args.compile_steps, 0, multiple)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step(forward, batch) -> float:
        start = time.perf_counter()
        loss = forward(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    compiled = torch.compile(model)  # what accelerate does for --torch_compile: inductor, default mode, dynamic=None
    times, compiled_at = [], []
    for i, (batch, _) in enumerate(batches):
        graphs = counters["stats"]["unique_graphs"]
        times.append(step(compiled, batch))
        if counters["stats"]["unique_graphs"] > graphs:
            compiled_at.append(i)
    steady = [i for i in range(len(batches)) if i not in compiled_at]
    eager_steps = list(range(1, min(args.eager_steps, len(batches) - 1) + 1))
    eager = [step(model, batches[i][0]) for i in eager_steps]

    def count(indices, what):
        if what == "real":
            return sum(batches[i][1] for i in indices)
        if what == "trained":
            return sum(int((batches[i][0]["labels"][:, 1:] != -100).sum()) for i in indices)
        return sum(batches[i][0]["input_ids"].numel() for i in indices)

    steady_seconds = sum(times[i] for i in steady)
    per_step = steady_seconds / len(steady)
    eager_per_step = sum(eager) / len(eager)
    eager_tps = count(eager_steps, "real") / sum(eager)
    compiled_tps = count(steady, "real") / steady_seconds
    # The compiles' cost beyond a steady step, against the time each later step saves (tokens/s, so that
    # dynamic padding's varying lengths compare): compiled is worth it after this many steps.
    overhead = sum(times[i] for i in compiled_at) - len(compiled_at) * per_step
    saved = eager_per_step * (1 - eager_tps / compiled_tps)
    return {"model": model_name, "mode": f"{mode}_compiled", "steps": len(steady), "seconds_per_step": per_step,
            "rows_per_step": batches[0][0]["input_ids"].shape[0], "total_tokens": count(steady, "total"),
            "real_tokens": count(steady, "real"), "trained_tokens": count(steady, "trained"),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "compile_steps": len(batches), "pad_to_multiple_of": multiple,
            "shapes": len({tuple(b["input_ids"].shape) for b, _ in batches}),
            "first_step_seconds": times[0], "compiled_at_steps": compiled_at, "recompiles": len(reasons),
            "recompile_seconds": sum(times[i] for i in compiled_at[1:]), "recompile_reasons": reasons,
            "graph_breaks": sum(counters["graph_break"].values()), "unique_graphs": counters["stats"]["unique_graphs"],
            "eager_steps": len(eager), "eager_seconds_per_step": eager_per_step,
            "eager_real_tokens_per_second": eager_tps, "compiled_real_tokens_per_second": compiled_tps,
            "break_even_steps": overhead / saved if saved > 0 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="demo model only, 4 steps (a smoke test)")
    parser.add_argument("--labelled_logits_only", type=int, default=1,
                        help="1 (qlaunch's default): qlaunch's modes compute logits only at labelled positions; "
                        "0: every position. pad_to_max (Qwen's way) always computes every position.")
    parser.add_argument("--json", default=os.path.join(REPO, "bench", "results", "throughput.json"))
    parser.add_argument("--compile", action="store_true", help="also the compiled rows (see above; minutes each)")
    parser.add_argument("--compile_steps", type=int, default=200, help="steps of each compiled row (--quick: 8)")
    parser.add_argument("--compile_modes", default="packing,dynamic")
    parser.add_argument("--compile_padding", type=int, default=1,
                        help="1: the collator's padding for --torch_compile (collate.compile_padding); 0: none")
    parser.add_argument("--eager_steps", type=int, default=20, help="uncompiled steps of a compiled row, compared")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run = compiled_worker if args.worker[1].endswith("_compiled") else worker
        print(json.dumps(run(args.worker[0], args.worker[1].removesuffix("_compiled"), args)))
        return
    import tempfile

    work = tempfile.mkdtemp(prefix="qlaunch-bench-")
    models = ["demo"] if args.quick else list(MODELS)
    steps = 4 if args.quick else args.steps
    rows = []
    for model in models:
        for mode in MODES:
            cmd = [sys.executable, __file__, "--worker", model, mode, "--work", work, "--max_length",
                   str(args.max_length), "--batch_size", str(args.batch_size), "--steps", str(steps), "--samples",
                   str(args.samples), "--labelled_logits_only", str(args.labelled_logits_only)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ,
                                                                                           OMP_NUM_THREADS="1"))
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    compile_modes = [m for m in args.compile_modes.split(",") if m] if args.compile else []
    for mode in compile_modes:
        model = models[-1]
        cmd = [sys.executable, __file__, "--worker", model, f"{mode}_compiled", "--work", work, "--max_length",
               str(args.max_length), "--batch_size", str(args.batch_size), "--samples", str(args.samples),
               "--compile_steps", str(min(args.compile_steps, 8) if args.quick else args.compile_steps),
               "--compile_padding", str(args.compile_padding), "--eager_steps", str(args.eager_steps)]
        env = dict(os.environ, OMP_NUM_THREADS="1", TORCHINDUCTOR_CACHE_DIR=os.path.join(work, f"inductor-{mode}"))
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'model':12} {'mode':22} {'rows':>4} {'real tok/s':>11} {'trained tok/s':>14} {'padding':>8} "
          f"{'s/step':>7} {'peak RSS':>9}")
    for r in rows:
        seconds = r["seconds_per_step"] * r["steps"]
        r["real_tokens_per_second"] = r["real_tokens"] / seconds
        r["trained_tokens_per_second"] = r["trained_tokens"] / seconds
        r["padding_fraction"] = 1 - r["real_tokens"] / r["total_tokens"]
        print(f"{r['model']:12} {r['mode']:22} {r['rows_per_step']:>4} {r['real_tokens_per_second']:>11.0f} "
              f"{r['trained_tokens_per_second']:>14.0f} {100 * r['padding_fraction']:>7.1f}% "
              f"{r['seconds_per_step']:>7.3f} {r['peak_rss_mib']:>7.0f}MiB")
    summary = {}
    for model in models:
        by = {r["mode"]: r for r in rows if r["model"] == model}
        summary[model] = {f"{m}_vs_dynamic_real_tokens_per_second":
                          by[m]["real_tokens_per_second"] / by["dynamic"]["real_tokens_per_second"] for m in MODES}
        for m in compile_modes:
            if f"{m}_compiled" in by:  # against the uncompiled row of its mode (qlaunch's default: labelled logits)
                summary[model][f"{m}_compiled_vs_{m}_real_tokens_per_second"] = \
                    by[f"{m}_compiled"]["real_tokens_per_second"] / by[m]["real_tokens_per_second"]
        print(f"{model}: packing {summary[model]['packing_vs_dynamic_real_tokens_per_second']:.2f}x the real "
              f"tokens/s of dynamic padding (at equal samples per step "
              f"{summary[model]['packing_equal_samples_vs_dynamic_real_tokens_per_second']:.2f}x); pad_to_max "
              f"{summary[model]['pad_to_max_vs_dynamic_real_tokens_per_second']:.2f}x")
    compiled_rows = [r for r in rows if "recompiles" in r]
    if compiled_rows:
        print(f"\n{'model':12} {'mode':18} {'steps':>5} {'shapes':>6} {'1st step':>8} {'recompiles':>10} "
              f"{'recomp s':>8} {'s/step':>7} {'eager s/step':>12} {'tok/s vs eager':>14} {'break-even':>10}")
        for r in compiled_rows:
            speedup = r["compiled_real_tokens_per_second"] / r["eager_real_tokens_per_second"]
            even = f"{r['break_even_steps']:.0f}" if r["break_even_steps"] is not None else "never"
            print(f"{r['model']:12} {r['mode']:18} {r['compile_steps']:>5} {r['shapes']:>6} "
                  f"{r['first_step_seconds']:>7.1f}s {r['recompiles']:>10} {r['recompile_seconds']:>7.1f}s "
                  f"{r['seconds_per_step']:>7.3f} {r['eager_seconds_per_step']:>12.3f} {speedup:>13.2f}x {even:>10}")
            for reason in r["recompile_reasons"]:
                print("    recompiled: " + " | ".join(line.strip() for line in reason.splitlines()[2:]))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"benchmark": "throughput", "max_length": args.max_length, "batch_size": args.batch_size,
                   "labelled_logits_only": bool(args.labelled_logits_only),
                   "rows": rows, "summary": summary,
                   **({"compile": {"steps": args.compile_steps, "modes": compile_modes,
                                   "padding": bool(args.compile_padding), "eager_steps": args.eager_steps}}
                      if compile_modes else {})}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
