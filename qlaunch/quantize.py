"""Quantize a full-precision (e.g. merged) model to GPTQ Int4 with a qlaunch data file as calibration.

    python -m qlaunch.quantize --model MERGED --data calib.json --out INT4 [--bits 4] [--group_size 128]
                               [--desc_act] [--num_samples 128] [--report | --report_only]

Replaces Qwen's `run_gptq.py` (auto-gptq, which does not work with transformers 5) with GPT-QModel's own
API. Calibration samples are conversations from a .json / .jsonl file in any format finetune.py reads,
rendered with the tokenizer's chat template and tokenized exactly as training sees them. The output is
the v1 `gptq` checkpoint format (`checkpoint_format: gptq`, int32 qweight/qzeros, fp16 scales) that
`finetune.py --q_lora`, transformers (+ gptqmodel) and vLLM load. `--report` adds a per-layer error
report (GPTQ vs NF4 vs FP4, qlaunch/model/quant_error.py); `--report_only` writes only the report.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import time

from qlaunch.config.domains import QUANTIZE, CommandParser, domain_problems
from qlaunch.config.errors import UsageError

PROG = "qlaunch.quantize"
INFO = "quantize_info.json"
BITS = (2, 4, 8)  # widths that pack evenly into int32 words (v1 3-bit packing is a different layout)
WEIGHT_FILES = (".safetensors", ".bin")


def make_parser() -> argparse.ArgumentParser:
    parser = CommandParser("qlaunch.quantize", {}, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="full-precision model directory (e.g. qlaunch.merge's --out)")
    parser.add_argument("--data", required=True, help="calibration data: .json / .jsonl in any finetune.py format")
    parser.add_argument("--out", required=True, help="directory for the GPTQ model (and the report)")
    parser.add_argument("--bits", type=int, default=4, help=f"bits per weight, one of {', '.join(map(str, BITS))}")
    parser.add_argument("--group_size", type=int, default=128, help="input rows sharing one scale; -1 = per column")
    parser.add_argument("--desc_act", action="store_true", help="quantize columns in order of activation size "
                        "(act-order: a little more accurate, slower kernels)")
    parser.add_argument("--num_samples", type=int, default=128, help="calibration conversations (default 128; "
                        "a seeded random pick when the file holds more)")
    parser.add_argument("--model_max_length", type=int, default=2048, help="tokens per calibration sample")
    parser.add_argument("--system_message", default="You are a helpful assistant.",
                        help="system prompt of records without one, as in finetune.py ('' for none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration pick")
    parser.add_argument("--report", action="store_true", help="also write the per-layer GPTQ/NF4/FP4 error report")
    parser.add_argument("--report_only", action="store_true", help="write only the report, no model")
    parser.add_argument("--trust_remote_code", action="store_true", help="run code shipped with the checkpoint")
    return parser


def _model_problems(model: str) -> list[str]:
    if not os.path.isdir(model):
        return [f"--model: not a directory: {model!r}. Pass a local full-precision model directory "
                "(e.g. the --out of python -m qlaunch.merge)."]
    config_path = os.path.join(model, "config.json")
    if not os.path.isfile(config_path):
        return [f"--model: no config.json in {model!r}; pass a save_pretrained model directory."]
    if not any(name.endswith(WEIGHT_FILES) for name in os.listdir(model)):
        return [f"--model: no weights (*.safetensors / *.bin) in {model!r}."]
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return [f"--model: {config_path} cannot be read as JSON ({e})."]
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method:
        return [f"--model: {model!r} is already quantized ({method}); quantize the full-precision model "
                "(e.g. the merged one) instead."]
    return []


def input_widths(config: dict) -> set[int]:
    """in_features of the decoder blocks' projections, read from a Llama/Qwen2-style config.json."""
    hidden = config.get("hidden_size")
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (hidden // heads if hidden and heads else None)
    widths = {hidden, config.get("intermediate_size"), heads * head_dim if heads and head_dim else None}
    return {w for w in widths if isinstance(w, int)}


def check_args(args) -> list[str]:
    """Every problem with the arguments, before the tokenizer, data or model is loaded."""
    from qlaunch.config.checkpoint import INSTALL_HINT
    from qlaunch.config.files import file_problem, overlap_problems

    problems = []
    if importlib.util.find_spec("gptqmodel") is None:
        problems.append(f"GPTQ quantization needs gptqmodel, not installed: {INSTALL_HINT['gptqmodel']}")
    if (args.report or args.report_only) and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(f"--report compares with NF4/FP4 and needs bitsandbytes, not installed: "
                        f"{INSTALL_HINT['bitsandbytes']}")
    model_problems = _model_problems(args.model)
    problems += model_problems
    data_problem = file_problem(args.data)
    if data_problem:
        problems.append(f"--data: {data_problem} Pass a .json or .jsonl file.")
    elif not args.data.endswith((".json", ".jsonl")):
        problems.append(f"--data {args.data!r}: expected a .json or .jsonl file.")
    if os.path.isfile(args.out):
        problems.append(f"--out {args.out!r} is a file; pass a directory.")
    problems += overlap_problems({"--out": args.out}, {"--model": args.model, "--data": args.data})
    if args.bits not in BITS:
        problems.append(f"--bits {args.bits}: choose one of {', '.join(map(str, BITS))}.")
    if args.group_size != -1 and args.group_size < 1:
        problems.append(f"--group_size {args.group_size}: pass a positive group size (128, 64, 32) or -1.")
    elif args.group_size > 0 and not model_problems:
        with open(os.path.join(args.model, "config.json")) as f:
            bad = sorted(w for w in input_widths(json.load(f)) if w % args.group_size)
        if bad:
            problems.append(f"--group_size {args.group_size} does not divide the projections' input width "
                            f"{', '.join(map(str, bad))}; pick a divisor (e.g. 32) or -1.")
    problems += domain_problems(args, QUANTIZE)  # with every other problem (the parser's own check is off)
    if args.report and args.report_only:
        problems.append("--report and --report_only: choose one (--report_only writes the report without a model).")
    return problems


def pick_samples(samples: list, n: int, seed: int) -> list:
    """n samples in file order: all of them, or a seeded random subset."""
    if len(samples) <= n:
        return samples
    keep = sorted(random.Random(seed).sample(range(len(samples)), n))
    return [samples[i] for i in keep]


def calibration_data(tokenizer, path: str, num_samples: int, max_length: int, system_message: str, seed: int):
    """Tokenized calibration conversations (as training renders them) and their TokenizeStats."""
    from qlaunch.data.formats import load_samples
    from qlaunch.data.tokenize import TokenizeStats, tokenize_messages

    stats = TokenizeStats()
    batches = []
    for messages in pick_samples(load_samples(path, system_message), num_samples, seed):
        encoded = tokenize_messages(tokenizer, messages, max_length, "truncate", stats)
        if encoded is not None:
            ids = encoded["input_ids"]
            batches.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    if not batches:
        raise UsageError(f"--data {path!r}: no calibration sample left after tokenizing; check the file.")
    return batches, stats


class LayerProgress:
    """gptqmodel's layer callback: one line per finished decoder layer (its own bars redraw in place)."""

    def __init__(self, layers: int):
        self.layers, self.start, self.seen = layers, time.monotonic(), set()

    def layer_complete(self, layer_idx: int, submodule_finalized: bool):
        if layer_idx in self.seen:  # gptqmodel may report a layer twice (before and after its modules finalize)
            return None
        self.seen.add(layer_idx)
        print(f"{PROG}: layer {layer_idx + 1}/{self.layers} quantized ({time.monotonic() - self.start:.1f} s)",
              file=sys.stderr, flush=True)
        return None


def gptq_quantize(args, save_dir: str, calibration, tokenizer) -> list[dict]:
    """Run GPTQ with gptqmodel and save the v1 checkpoint to save_dir; return gptqmodel's per-module log."""
    import torch

    from qlaunch.model.gptq import prepare_gptqmodel

    prepare_gptqmodel()  # on fewer than 4 cores gptqmodel would refuse to start
    with contextlib.redirect_stdout(sys.stderr):  # its import prints a banner
        from gptqmodel import GPTQModel, QuantizeConfig
        from gptqmodel.looper import loop_processor

    # gptqmodel 7.6 appends per-layer logs to ./logs of the current directory (a module constant, no
    # option); the same log is returned and kept in quantize_info.json, so send its files to a temp dir.
    log_dir = tempfile.mkdtemp(prefix="qlaunch-gptq-logs-")
    if hasattr(loop_processor, "_PROJECT_LOG_DIR"):
        from pathlib import Path

        loop_processor._PROJECT_LOG_DIR = Path(log_dir)

    config = QuantizeConfig(
        bits=args.bits, group_size=args.group_size, desc_act=args.desc_act, sym=True,
        # gptqmodel's group-aware reordering needs groups and excludes act-order; the saved g_idx stays trivial.
        act_group_aware=not args.desc_act and args.group_size > 0,
        offload_to_disk=False,  # tiny to medium models fit in RAM; disk offload only slows CPU runs
    )
    # fp16 dense weights, as Qwen's Int4 checkpoints: the GPTQ kernels of vLLM and transformers compute in fp16.
    # gptqmodel logs and draws its progress bars on stdout: keep stdout for the result and the report.
    with contextlib.redirect_stdout(sys.stderr):
        model = GPTQModel.load(args.model, config, dtype=torch.float16, trust_remote_code=args.trust_remote_code)
        model.layer_callback = LayerProgress(model.model.config.num_hidden_layers)
        try:
            log = model.quantize(calibration, tokenizer=tokenizer, batch_size=1)
        finally:
            shutil.rmtree(log_dir, ignore_errors=True)
        model.save(save_dir)
    tokenizer.save_pretrained(save_dir)  # the template training used (ChatML fallback included)
    return log.get("gptq", []) if isinstance(log, dict) else []


def prepare(args):
    """Checked arguments → (tokenizer, calibration batches, stats); every input problem is a UsageError."""
    problems = check_args(args)
    if problems:
        raise UsageError(problems)
    from qlaunch.model.load import load_tokenizer

    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    calibration, stats = calibration_data(tokenizer, args.data, args.num_samples, args.model_max_length,
                                          args.system_message, args.seed)
    return tokenizer, calibration, stats


def report(args, quantized_dir: str, calibration) -> None:
    from qlaunch.model.quant_error import build_report, print_table, write_report

    result = build_report(args.model, quantized_dir, calibration, args.bits, args.group_size, args.trust_remote_code)
    print_table(result)
    print(f"{PROG}: report → {', '.join(write_report(result, args.out))}")


def main(argv=None) -> None:
    args = make_parser().parse_args(argv)
    try:
        tokenizer, calibration, stats = prepare(args)
    except UsageError as e:
        print(e.render(PROG), file=sys.stderr)
        sys.exit(2)
    print(f"{PROG}: calibration from {args.data}: {stats.summary(args.model_max_length)}", file=sys.stderr)
    from qlaunch.train.checkpoints import staged_output

    if args.report_only:  # the report reads GPTQ back from a saved checkpoint too, a temporary one
        os.makedirs(args.out, exist_ok=True)
        save_dir = tempfile.mkdtemp(prefix="qlaunch-gptq-")
        try:
            gptq_quantize(args, save_dir, calibration, tokenizer)
            report(args, save_dir, calibration)
        finally:
            shutil.rmtree(save_dir, ignore_errors=True)
        return
    start = time.monotonic()
    with staged_output(args.out) as staged:  # config.json lands last: a cut-short run is not a model
        gptq_log = gptq_quantize(args, staged, calibration, tokenizer)
        seconds = time.monotonic() - start
        write_info(args, stats, len(calibration), seconds, gptq_log, staged)
    print(f"{PROG}: GPTQ {args.bits}-bit (group {args.group_size}, desc_act {args.desc_act}) → {args.out} "
          f"in {seconds:.1f} s")
    if args.report:
        report(args, args.out, calibration)


def write_info(args, stats, samples: int, seconds: float, gptq_log: list[dict], directory: str) -> None:
    """What was quantized from what, beside the checkpoint (the config's meta only names the quantizer)."""
    info = {"source": os.path.abspath(args.model), "calibration": os.path.abspath(args.data),
            "calibration_samples": samples, "calibration_tokens": stats.tokens,
            "bits": args.bits, "group_size": args.group_size, "desc_act": args.desc_act,
            "seconds": round(seconds, 1), "gptq_log": gptq_log}
    with open(os.path.join(directory, INFO), "w") as f:
        json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
