"""Peak memory and step time of the loss: logits at every position vs only at labelled positions.

    python bench/logits_memory.py [--seq_len 2048] [--batch_size 2] [--vocab 128256] [--trained 0.5]

A Llama-shaped model with a large vocabulary (Llama-3's 128,256 by default) and a small body, so
the logits dominate as they do at long sequence lengths on real models: one forward + backward of
a LoRA model per mode, each mode in its own process so the peak RSS is its own. `full` is
transformers' ordinary path (lm_head and the fp32 loss over every position); `labelled` is
qlaunch's default (--labelled_logits_only: logits_to_keep mask + shift_labels, qlaunch/train/loss.py).
The first (1 - trained) of every row is a prompt (label -100), like assistant-only chat labels.
Prints a table and writes JSON; the ratio within one run is what to read.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODES = ("full", "labelled")


def worker(mode: str, args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlaunch.train.loss import labelled_positions

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_len,
                         attn_implementation="sdpa", use_cache=False)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(4, args.vocab, (args.batch_size, args.seq_len))
    labels = ids.clone()
    labels[:, : int(args.seq_len * (1 - args.trained))] = -100
    batch = {"input_ids": ids, "labels": labels, "num_items_in_batch": (labels[:, 1:] != -100).sum()}
    if mode == "labelled":
        mask, targets = labelled_positions(labels)
        batch.update(logits_to_keep=mask, shift_labels=targets)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    out = model(**batch)
    out.loss.backward()
    seconds = time.perf_counter() - start
    return {"mode": mode, "loss": out.loss.item(), "logits_shape": list(out.logits.shape), "seconds": seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_step_mib": baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--trained", type=float, default=0.5, help="fraction of each row that is labelled")
    parser.add_argument("--json", default=os.path.join(REPO, "bench", "results", "logits_memory.json"))
    parser.add_argument("--worker", metavar="MODE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    rows = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--worker", mode, "--seq_len", str(args.seq_len), "--batch_size",
               str(args.batch_size), "--vocab", str(args.vocab), "--trained", str(args.trained)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"vocab {args.vocab:,}, {args.batch_size} x {args.seq_len} tokens, {args.trained:.0%} labelled")
    print(f"{'mode':10} {'logits':>18} {'step s':>8} {'peak RSS':>10} {'step peak':>10} {'loss':>10}")
    for r in rows:
        r["step_peak_mib"] = r["peak_rss_mib"] - r["rss_before_step_mib"]
        print(f"{r['mode']:10} {str(tuple(r['logits_shape'])):>18} {r['seconds']:>8.2f} {r['peak_rss_mib']:>8.0f}Mi "
              f"{r['step_peak_mib']:>8.0f}Mi {r['loss']:>10.6f}")
    full, labelled = rows
    summary = {"step_peak_ratio": labelled["step_peak_mib"] / full["step_peak_mib"],
               "peak_rss_ratio": labelled["peak_rss_mib"] / full["peak_rss_mib"],
               "speedup": full["seconds"] / labelled["seconds"],
               "loss_rel_diff": abs(labelled["loss"] - full["loss"]) / abs(full["loss"])}
    print(f"labelled vs full: step peak {summary['step_peak_ratio']:.2f}x, peak RSS {summary['peak_rss_ratio']:.2f}x, "
          f"{summary['speedup']:.2f}x faster, loss rel diff {summary['loss_rel_diff']:.1e}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"benchmark": "logits_memory", **vars(args), "rows": rows, "summary": summary}, f, indent=2,
                  default=str)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
