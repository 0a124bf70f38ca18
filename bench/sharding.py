"""What each rank holds under FSDP2 and ZeRO-3, measured, beside the plan's per-device numbers.

    python bench/sharding.py [--quick] [--quant nf4|gptq] [--steps N]

A ~300M-parameter random Llama (built locally; weights dominate) trains Q-LoRA for 2 steps (--steps) under
FSDP2 and ZeRO-3 with N = 2 and 4 CPU processes — on its NF4 quantization (bitsandbytes, at load), or
with `--quant gptq` on our own GPTQ Int4 checkpoint of it (`python -m qlaunch.quantize`, ~3 min here),
whose packed weights the engines shard as parameters (qlaunch/model/gptq_shard.py); torchrun through
launch/qlora_ds.sh, gloo, 127.0.0.1. Each rank records, through the test hook tests/integration/_hooks/dump_weights: the bytes
of parameter storage it holds after training (its shard), its peak RSS when training starts (the
model loaded, not yet sharded) and at the end, and how many times it read the checkpoint
(`reads`: under FSDP2 rank 0 alone reads a 4-bit base; the plan's load phase is rank 0's). Beside them: `python -m qlaunch.plan` for the same
flags and world size (this CPU: the load phase, which here includes the memory-mapped fp32 checkpoint,
and the per-process peak = the larger of load and training).
With `--quant gptq` each world size is also run in one process with the same global batch: the
per-step losses and the adapter are compared (`loss rtol`, `adapter rtol`, relative to the largest).
`--quick`: N = 2 only. Prints a table, writes bench/results/sharding[_gptq][_n2][_Nsteps].json. Nothing else may run
meanwhile (two OpenMP threads on two cores wait for each other).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))  # random_llama, also when loaded by file path (tests)
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))

RANDOM_300M = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                   num_key_value_heads=16)
ENGINES = {"FSDP2": ["--fsdp", os.path.join(REPO, "fsdp_configs", "fsdp2.json")],
           "ZeRO-3": ["--deepspeed", os.path.join(REPO, "ds_configs", "zero3.json")]}
TRAIN = ["--model_max_length", "256", "--per_device_train_batch_size", "1", "--lora_r", "16",
         "--lora_dropout", "0", "--save_strategy", "no", "--logging_steps", "1", "--report_to", "none"]
GiB = 1024**3


def build_model(root: str, quant: str = "nf4") -> tuple[str, str]:
    """(the ~300M random Llama's directory — or its GPTQ Int4 checkpoint — , the demo training data)."""
    from random_llama import random_llama

    model, demo = random_llama(root, "random-300M", RANDOM_300M)
    if quant == "gptq":
        out = os.path.join(root, "random-300M-int4")
        subprocess.run([sys.executable, "-m", "qlaunch.quantize", "--model", model, "--data", demo["train"], "--out", out,
                        "--num_samples", "16", "--model_max_length", "128"], check=True, cwd=REPO)
        model = out
    return model, demo["train"]


def train_flags(steps: int) -> list[str]:
    return ["--max_steps", str(steps), *TRAIN]


def planned(model: str, data: str, engine: str, n: int, steps: int) -> dict:
    flags = ENGINES[engine]
    engine_flag = ["--fsdp_config", flags[1]] if engine == "FSDP2" else flags
    proc = subprocess.run([sys.executable, "-m", "qlaunch.plan", "--config", os.path.join(REPO, "recipes", "qlora-default.yaml"),
                           "--model_name_or_path", model, "--q_lora", *engine_flag, *train_flags(steps), "--num_gpus", str(n),
                           "--json"], capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout)["memory_gb"]


def train(model: str, data: str, engine: str | None, n: int, work: str, steps: int):
    from launchkit import base_env, launch

    if engine is None:  # one process, the same global batch
        out = os.path.join(work, f"single-{n}")
        args = ["-m", model, "-d", data, "-o", out, "--", *train_flags(steps), "--per_device_train_batch_size", str(n)]
        run = launch("qlora_single_gpu.sh", args, out, timeout=3600)
    else:
        out = os.path.join(work, f"{engine}-{n}")
        run = launch("qlora_ds.sh", [*ENGINES[engine], "-m", model, "-d", data, "-o", out, "--", *train_flags(steps)],
                     out, env=base_env(NPROC_PER_NODE=n), timeout=3600)
    if run.returncode != 0:
        raise RuntimeError(run.tail())
    return run


def equality(run, single) -> dict:
    """Per-step losses and adapter of a sharded run against one process with the same global batch."""
    import numpy as np
    from launchkit import max_abs_diff

    losses, ref = np.array(run.losses()), np.array(single.losses())
    reference = single.adapter()
    scale = max(float(t.abs().max()) for t in reference.values())
    return {"loss_rtol": float(np.max(np.abs(losses - ref) / np.abs(ref))),
            "adapter_rtol": max_abs_diff(run.adapter(), reference) / scale}


def measure(run) -> list[dict]:
    import torch

    rows = []
    for f in sorted(run.dump.glob("rank*.pt")):
        d = torch.load(f, weights_only=True)
        rows.append({"rank": d["rank"], "world_size": d["world_size"], "local_param_bytes": d["local_param_bytes"],
                     "full_param_bytes": d["full_param_bytes"], "rss_load_gib": d["rss_at_train_start_kib"] / 2**20,
                     "rss_peak_gib": d["peak_rss_kib"] / 2**20, "seconds": run.seconds,
                     "from_pretrained_calls": d.get("from_pretrained_calls")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--quant", choices=("nf4", "gptq"), default="nf4")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per run (default 2)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="qlaunch-sharding-")
    try:
        model, data = build_model(work, args.quant)
        largest_layer = 4 * max(RANDOM_300M["intermediate_size"] * RANDOM_300M["hidden_size"],
                                RANDOM_300M["hidden_size"] ** 2)  # fp32-stored 4-bit codes: an upper bound
        results = []
        for n in ((2,) if args.quick else (2, 4)):
            single = train(model, data, None, n, work, args.steps) if args.quant == "gptq" else None
            for engine in ENGINES:
                plan = planned(model, data, engine, n, args.steps)
                run = train(model, data, engine, n, work, args.steps)
                equal = equality(run, single) if single else {}
                for row in measure(run):
                    share = row["local_param_bytes"] / row["full_param_bytes"] if row["full_param_bytes"] else None
                    results.append({"engine": engine, "steps": args.steps, **row, "share": share,
                                    "within_1_over_n_plus_a_layer": (row["local_param_bytes"]
                                                                     <= row["full_param_bytes"] / n + largest_layer),
                                    "plan_load_gib": plan["load_peak"], "plan_training_gib": plan["training_peak"],
                                    "plan_peak_gib": plan["per_device_peak"], "quant": args.quant, **equal})
        header = (f"{'engine':7} {'N':>2} {'rank':>4} {'local/full params':>18} {'<=1/N+layer':>11} "
                  f"{'reads':>5} {'RSS load':>9} {'plan load':>9} {'ratio':>5} {'RSS peak':>9} {'plan peak':>9} {'ratio':>5}"
                  + (f" {'loss rtol':>9} {'adapter rtol':>12}" if args.quant == "gptq" else ""))
        print(header)
        for r in results:
            share = f"{r['share']:.3f}" if r["share"] is not None else "n/a"
            print(f"{r['engine']:7} {r['world_size']:>2} {r['rank']:>4} {share:>18} "
                  f"{str(r['within_1_over_n_plus_a_layer']):>11} {r['from_pretrained_calls']!s:>5} {r['rss_load_gib']:>8.2f}G {r['plan_load_gib']:>8.2f}G "
                  f"{r['rss_load_gib'] / r['plan_load_gib']:>5.2f} {r['rss_peak_gib']:>8.2f}G {r['plan_peak_gib']:>8.2f}G "
                  f"{r['rss_peak_gib'] / r['plan_peak_gib']:>5.2f}"
                  + (f" {r['loss_rtol']:>9.2g} {r['adapter_rtol']:>12.2g}" if "loss_rtol" in r else ""))
        os.makedirs(os.path.join(REPO, "bench", "results"), exist_ok=True)
        name = "sharding" + ("" if args.quant == "nf4" else f"_{args.quant}")  # a partial run keeps the full one
        name += ("_n2" if args.quick else "") + (f"_{args.steps}steps" if args.steps != 2 else "") + ".json"
        with open(os.path.join(REPO, "bench", "results", name), "w") as f:
            json.dump(results, f, indent=2)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
