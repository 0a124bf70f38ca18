"""Peak memory of the streaming merge against the largest shard, and bit-equality with the in-memory merge.

    python bench/merge_memory.py [--quant nf4|none] [--shards 4]

A ~370M-parameter random Llama (bench/random_llama.py) saved in bfloat16 as --shards safetensors files gets
a LoRA adapter on every linear layer (r 16, B random so the update is not zero; run_info.json says it was
trained on the NF4 base). Each phase runs in its own process, which reports its peak RSS (VmHWM) above its
RSS after importing torch, transformers, peft, bitsandbytes and gptqmodel (~540 MB here, what any merge
process starts with):

- stream:    qlaunch.model.merge_stream writes the merged model (bf16) — the target: peak ≤ largest shard +
             adapter + 25%;
- in-memory: the whole base dequantized in float32 and peft's merge_and_unload (qlaunch's merge before
             streaming, kept as the tests' reference) — then every streamed tensor is compared with it, bit
             for bit (both in float32 output for that comparison);
- command:   `python -m qlaunch.merge` (stream + the proof, which holds the adapter model as it loads for
             inference: the 4-bit base, its other weights in float32 on the CPU) — for information.
Prints a table, writes bench/results/merge_memory[_none].json. Nothing else may run meanwhile.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))
MB = 1024**2
DIMS = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
            num_key_value_heads=16)


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def build(root: str, shards: int, quant: str) -> tuple[str, str]:
    """(base directory in `shards` bf16 files, adapter directory)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from random_llama import random_llama

    source, _ = random_llama(root, "random-370M", DIMS)
    base, adapter = os.path.join(root, f"base-{shards}"), os.path.join(root, f"adapter-{quant}")
    if not os.path.isdir(base):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(base, max_shard_size=f"{size // shards // MB + 1}MB")
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(source).save_pretrained(base)
    if not os.path.isdir(adapter):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.02)
        model.save_pretrained(adapter)
        with open(os.path.join(adapter, "run_info.json"), "w") as f:
            json.dump({"quant_method": None if quant == "none" else quant, "bnb_4bit_use_double_quant": True}, f)
    return base, adapter


def phase(args) -> None:
    """One phase in this process; prints a JSON line with its measurements."""
    import torch
    # The libraries a merge process imports (peft imports bitsandbytes and gptqmodel when they are installed):
    # a fixed cost, measured before the baseline so the peak counts what the merge holds.
    import bitsandbytes  # noqa: F401
    import gptqmodel  # noqa: F401
    import peft  # noqa: F401
    from transformers import AutoConfig, LlamaForCausalLM  # noqa: F401

    from qlaunch.model.merge_stream import StreamingMerge
    from qlaunch.model.shards import CheckpointReader

    quant = None if args.quant == "none" else args.quant
    baseline, start = rss("VmRSS"), time.time()
    result = {}
    if args.phase == "command":
        import runpy

        sys.argv = ["qlaunch.merge", "--adapter", args.adapter, "--out", args.out]
        runpy.run_module("qlaunch.merge", run_name="__main__")
        result["report"] = json.load(open(os.path.join(args.out, "merge_report.json")))
    elif args.phase == "stream":
        merge = StreamingMerge(args.base, args.adapter, quant, getattr(torch, args.dtype),
                               config=AutoConfig.from_pretrained(args.base))
        os.makedirs(args.out, exist_ok=True)
        result["files"] = merge.write(args.out, 1 << 40)
    else:
        sys.path.insert(0, os.path.join(REPO, "tests", "unit", "model"))
        from test_merge_stream import in_memory_merge

        reference = in_memory_merge(args.adapter, args.base, quant)
        result["peak_above_start"] = rss("VmHWM") - baseline
        streamed = CheckpointReader(args.out)
        unequal = [n for n in streamed.names() if not torch.equal(streamed.read(n), reference[n])]
        result.update(compared=len(streamed.names()), unequal=len(unequal), first_unequal=unequal[:3])
    result.setdefault("peak_above_start", rss("VmHWM") - baseline)
    result.update(seconds=round(time.time() - start, 1), start_rss=baseline)
    print("RESULT " + json.dumps(result))


def run_phase(name: str, base: str, adapter: str, out: str, quant: str, dtype: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--phase", name, "--base", base, "--adapter", adapter, "--out", out,
                        "--quant", quant, "--dtype", dtype], capture_output=True, text=True, cwd=REPO)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if r.returncode or not lines:
        raise SystemExit(f"phase {name} failed:\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quant", default="nf4", choices=["nf4", "none"])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--phase", choices=["stream", "in-memory", "command"], help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return phase(args)

    from qlaunch.config.weights import weight_files

    root = os.path.join(tempfile.gettempdir(), "qlaunch-bench-merge")
    base, adapter = build(root, args.shards, args.quant)
    files, _ = weight_files(base)
    largest = max(os.path.getsize(f) for f in files)
    adapter_bytes = os.path.getsize(os.path.join(adapter, "adapter_model.safetensors"))
    bound = (largest + adapter_bytes) * 1.25
    rows = {}
    out = os.path.join(root, "merged-bf16")
    rows["stream (bf16 out)"] = run_phase("stream", base, adapter, out, args.quant, "bfloat16")
    out32 = os.path.join(root, "merged-fp32")
    rows["stream (fp32 out)"] = run_phase("stream", base, adapter, out32, args.quant, "float32")
    rows["in-memory (fp32)"] = run_phase("in-memory", base, adapter, out32, args.quant, "float32")
    rows["qlaunch.merge command"] = run_phase("command", base, adapter, os.path.join(root, "merged-command"),
                                              args.quant, "auto")
    report = rows["qlaunch.merge command"].pop("report")
    summary = {"base_files": len(files), "largest_file_mb": largest / MB, "adapter_mb": adapter_bytes / MB,
               "bound_mb": bound / MB, "quant": args.quant, "phases": rows,
               "stream_within_bound": rows["stream (bf16 out)"]["peak_above_start"] <= bound
               and rows["stream (fp32 out)"]["peak_above_start"] <= bound,
               "bit_equal": rows["in-memory (fp32)"]["unequal"] == 0,
               "proof": report["exact"], "command_files": report["files"]}
    print(f"\nbase: {len(files)} files, largest {largest / MB:.0f} MB; adapter {adapter_bytes / MB:.1f} MB; "
          f"bound (largest + adapter) x 1.25 = {bound / MB:.0f} MB")
    print(f"{'phase':24} {'peak above start':>17} {'seconds':>8}")
    for name, row in rows.items():
        print(f"{name:24} {row['peak_above_start'] / MB:14.0f} MB {row['seconds']:8.1f}")
    print(f"streamed vs in-memory: {rows['in-memory (fp32)']['compared']} tensors, "
          f"{rows['in-memory (fp32)']['unequal']} unequal; proof {report['exact']['max_abs_logit_diff']:.3g} "
          f"(bound {report['exact']['bound']:.3g}, passed {report['exact']['passed']})")
    os.makedirs(os.path.join(REPO, "bench", "results"), exist_ok=True)
    path = os.path.join(REPO, "bench", "results", "merge_memory" + ("" if args.quant == "nf4" else "_none") + ".json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"→ {path}")


if __name__ == "__main__":
    main()
