"""Merge a (Q-)LoRA adapter into its base and save a plain full-precision model.

    python -m qlaunch.merge --adapter OUT --out MERGED [--base MODEL] [--dtype bfloat16]

A Q-LoRA adapter was trained against the *quantized* base, so it is merged into the
dequantized 4-bit weights (NF4/FP4 or GPTQ), not into the original checkpoint: that
reproduces the trained model (measured on CPU: GPTQ max logit difference ~1e-5 in fp32; NF4 as
close as bitsandbytes' own kernel is to its dequantized weights, ~1% of the logits on CPU where
it dequantizes to bf16), while merging into the original full-precision weights is off by the
whole quantization error. peft's own
merge into a Linear4bit re-quantizes the sum and loses the update's precision; into GPTQ it
refuses. The merged model loads with plain `AutoModelForCausalLM.from_pretrained`.
"""
from __future__ import annotations

import json
import os
import sys

import torch

from qlaunch.config.domains import MERGE, CommandParser
from qlaunch.config.errors import UsageError


def dequantized_weight(module) -> torch.Tensor | None:
    """The [out_features, in_features] float weight a quantized linear computes with, or None."""
    weight = getattr(module, "weight", None)
    if weight is not None and weight.__class__.__name__ == "Params4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if hasattr(module, "qweight") and hasattr(module, "dequantize_weight"):
        w = module.dequantize_weight().float()
        return w.t() if w.shape == (module.in_features, module.out_features) else w
    return None


def plain_copy(quantized_model, dtype: torch.dtype):
    """A full-precision model of the same architecture holding the dequantized weights."""
    from transformers import AutoModelForCausalLM

    from qlaunch.model.load import unquantized_config

    plain = AutoModelForCausalLM.from_config(unquantized_config(quantized_model.config), dtype=torch.float32)
    modules = dict(quantized_model.named_modules())
    state = {}
    for name, tensor in plain.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        source = modules.get(owner)
        dequantized = dequantized_weight(source) if (source is not None and leaf == "weight") else None
        if dequantized is not None:
            state[name] = dequantized
        elif source is not None and hasattr(source, leaf) and torch.is_tensor(getattr(source, leaf)):
            state[name] = getattr(source, leaf).detach().float()
        else:
            raise RuntimeError(f"cannot find {name} in the quantized model")
    plain.load_state_dict(state)
    return plain.to(dtype)


BUILTIN_PROBES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "List three prime numbers."}],
    [{"role": "user", "content": "Translate 'good morning' into German."}],
]
REPORT = "merge_report.json"
EXIT_MISMATCH = 4
# Minimum top-1 next-token agreement between the merged model and the adapter model. A LoRA merge
# into full-precision weights is exact up to float32 summation order (logit differences ~1e-6), so
# only exact near-ties may flip: 99.9%. Into dequantized 4-bit weights (or saved in 16 bits) the
# adapter model runs the 4-bit kernels, which compute in reduced precision (bitsandbytes on CPU
# dequantizes NF4 to bf16; GPTQ kernels to fp16): logit differences of ~1e-2, so 99%.
MIN_TOP1_EXACT, MIN_TOP1_QUANTIZED = 0.999, 0.99


def probe_conversations(adapter: str, probe_data: str | None, limit: int) -> tuple[list, str]:
    """Probe conversations: --probe_data, else the adapter's training data, else built-in ones."""
    from qlaunch.data.formats import load_samples
    from qlaunch.model.inference import read_run_info

    source = probe_data or read_run_info(adapter).get("data_path")
    if source and (probe_data or os.path.isfile(source)):
        return load_samples(source, "You are a helpful assistant.")[:limit], source
    return BUILTIN_PROBES[:limit], "built-in"


def probe_logits(model, tokenizer, conversations, max_tokens: int = 128) -> list[torch.Tensor]:
    model.eval()
    outputs = []
    for messages in conversations:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :max_tokens]
        with torch.no_grad():
            outputs.append(model(input_ids=ids.to(model.device)).logits[0].float().cpu())
    return outputs


def compare_logits(merged: list[torch.Tensor], reference: list[torch.Tensor]) -> dict:
    diffs = torch.cat([(m - r).abs().flatten() for m, r in zip(merged, reference)])
    agree = sum(int((m.argmax(-1) == r.argmax(-1)).sum()) for m, r in zip(merged, reference))
    positions = sum(m.shape[0] for m in merged)
    return {"max_abs_logit_diff": float(diffs.max()), "mean_abs_logit_diff": float(diffs.mean()),
            "top1_agreement": agree / positions, "positions": positions}


def merge_report(adapter: str, out: str, quant: str | None, dtype: str, into: str, probe_data: str | None,
                 trust_remote_code: bool, samples: int) -> dict:
    """Probe logits of the saved merged model vs the adapter model (the base as trained + adapter)."""
    from transformers import AutoModelForCausalLM

    from qlaunch.model.inference import load_for_inference

    conversations, source = probe_conversations(adapter, probe_data, samples)
    reference_model, tokenizer = load_for_inference(adapter=adapter, device="cpu", trust_remote_code=trust_remote_code)
    reference = probe_logits(reference_model, tokenizer, conversations)
    del reference_model
    merged_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=trust_remote_code)
    report = compare_logits(probe_logits(merged_model, tokenizer, conversations), reference)
    exact = quant is None and dtype == "float32"
    report.update(merged_into=into, probes=source, probe_samples=len(conversations), dtype=dtype,
                  min_top1_agreement=MIN_TOP1_EXACT if exact else MIN_TOP1_QUANTIZED)
    report["within_tolerance"] = report["top1_agreement"] >= report["min_top1_agreement"]
    with open(os.path.join(out, REPORT), "w") as f:
        json.dump(report, f, indent=2)
    return report


def merge(adapter: str, out: str, base: str | None = None, dtype: str = "float32",
          trust_remote_code: bool = False, probe_data: str | None = None, probe_samples: int = 8) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlaunch.config.files import overlap_problems
    from qlaunch.model.inference import (
        adapter_base,
        load_for_inference,
        read_run_info,
        remote_code_problem,
    )
    from qlaunch.model.load import load_tokenizer
    from qlaunch.train.checkpoints import staged_output

    given_base = base
    base = base or adapter_base(adapter)
    overlaps = overlap_problems({"--out": out}, {"--adapter": adapter, "--base": base, "--probe_data": probe_data})
    if overlaps:
        raise UsageError(overlaps)
    problem = remote_code_problem(base, adapter, trust_remote_code)
    if problem:
        raise UsageError(problem)
    if probe_data and not os.path.isfile(probe_data):
        raise UsageError(f"--probe_data: file not found: {probe_data!r}. Pass a .json or .jsonl data file.")
    trained_quant = read_run_info(adapter).get("quant_method")
    # --base: merge into that full-precision checkpoint, as given (to compare the two routes).
    quant = None if given_base else trained_quant
    if quant == "gptq":  # the trainable kernel keeps the packed layout that dequantize_weight() reads
        from qlaunch.model.gptq import gptq_training_config

        base_model = AutoModelForCausalLM.from_pretrained(
            base, quantization_config=gptq_training_config(), device_map={"": "cpu"}, dtype=torch.float32,
            trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(base, trust_remote_code)
    else:
        base_model, tokenizer = load_for_inference(base, None, quantization=quant or "none", device="cpu",
                                                   trust_remote_code=trust_remote_code)
    plain = plain_copy(base_model, torch.float32) if quant else base_model.float()
    merged = PeftModel.from_pretrained(plain, adapter).merge_and_unload()
    merged = merged.to(getattr(torch, dtype))
    into = f"dequantized {quant}" if quant else "base weights"
    info = {"adapter": os.path.abspath(adapter), "base": base, "merged_into": into, "dtype": dtype}
    with staged_output(out) as staged:  # config.json lands last: a cut-short merge is not a model
        merged.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        with open(os.path.join(staged, "merge_info.json"), "w") as f:
            json.dump(info, f, indent=2)
    del merged, plain, base_model
    info["report"] = merge_report(adapter, out, trained_quant, dtype, into, probe_data, trust_remote_code,
                                  probe_samples)
    return info


def main(argv=None) -> None:
    parser = CommandParser("qlaunch.merge", MERGE, description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="adapter directory (a LoRA / Q-LoRA run's output_dir)")
    parser.add_argument("--out", required=True, help="directory for the merged model")
    parser.add_argument("--base", help="base model (default: the one recorded in the adapter)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--probe_data", help="conversations to compare merged vs adapter model on "
                        "(default: the adapter's training data, else built-in prompts)")
    parser.add_argument("--probe_samples", type=int, default=8, help="how many probe conversations (default 8)")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="run code shipped with the base checkpoint (needed when training needed it)")
    args = parser.parse_args(argv)
    try:
        info = merge(args.adapter, args.out, args.base, args.dtype, args.trust_remote_code, args.probe_data,
                     args.probe_samples)
    except UsageError as e:
        print(e.render("qlaunch.merge"), file=sys.stderr)
        sys.exit(2)
    print(f"merged {info['adapter']} into the {info['merged_into']} of {info['base']} → {args.out} ({args.dtype})")
    r = info["report"]
    print(f"merged vs adapter model on {r['probe_samples']} probes ({r['probes']}, {r['positions']} positions): "
          f"top-1 agreement {r['top1_agreement']:.2%} (minimum {r['min_top1_agreement']:.1%}), "
          f"max |logit diff| {r['max_abs_logit_diff']:.3g}, mean {r['mean_abs_logit_diff']:.3g} "
          f"→ {os.path.join(args.out, REPORT)}")
    if not r["within_tolerance"]:
        if args.base:
            print("note: merged into the given full-precision --base, not the weights the adapter was trained "
                  "against; the difference above is that choice's cost.", file=sys.stderr)
        else:
            print(f"qlaunch.merge: error: the merged model disagrees with the adapter model on "
                  f"{1 - r['top1_agreement']:.2%} of next tokens; do not ship it (exit {EXIT_MISMATCH}).",
                  file=sys.stderr)
            sys.exit(EXIT_MISMATCH)


if __name__ == "__main__":
    main()
