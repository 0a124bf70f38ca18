"""Merge a (Q-)LoRA adapter into its base and save a plain full-precision model.

    python -m qlaunch.merge --adapter OUT --out MERGED [--base MODEL] [--dtype bfloat16]

A Q-LoRA adapter was trained against the *quantized* base, so it is merged into the
dequantized 4-bit weights (NF4/FP4 or GPTQ), not into the original checkpoint (which is off by
the whole quantization error). peft's own merge into a Linear4bit re-quantizes the sum and loses
the update's precision; into GPTQ it refuses. The merged model loads with plain
`AutoModelForCausalLM.from_pretrained`.

The proof compares the merged model with the adapter applied, unmerged, to the same dequantized
weights in float32: they must agree to float round-off (exit 4 otherwise). How the saved model
compares with the adapter on the base's own 4-bit kernels (which compute in bf16/fp16) is reported
as information, top-1 agreement counted only where the margin exceeds the kernels' measured noise.
"""
from __future__ import annotations

import json
import os
import sys

import torch

from qlaunch.config.domains import MERGE, CommandParser
from qlaunch.config.errors import UsageError
from qlaunch.model.inference import dequantized_weight


def plain_copy(quantized_model, dtype: torch.dtype):
    """A full-precision model of the same architecture holding the dequantized weights."""
    from transformers import AutoModelForCausalLM

    from qlaunch.config.skeleton import without_quantization

    plain = AutoModelForCausalLM.from_config(without_quantization(quantized_model.config), dtype=torch.float32)
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
# The proof: the merged model against the adapter applied, unmerged, to the same dequantized weights in
# float32. A merge is W + s*B@A instead of W@x + s*B@(A@x): equal up to float32 summation order, far
# below this bound (relative to the logits' scale); a wrong base, dequantization or scaling is far above.
EXACT_RTOL = 1e-4
# Information only: top-1 agreement of the saved model with the adapter running the 4-bit kernels
# (bitsandbytes computes in bf16 on CPU, GPTQ kernels in fp16), counted where the reference's top-1
# margin exceeds twice the kernels' measured noise; the other positions are near-ties.
MIN_TOP1_EXACT, MIN_TOP1_QUANTIZED = 0.999, 0.99


def probe_conversations(adapter: str, probe_data: str | None, limit: int) -> tuple[list, str]:
    """Probe conversations: --probe_data, else the adapter's training data, else built-in ones."""
    from qlaunch.data.formats import load_samples
    from qlaunch.model.inference import read_run_info

    source = probe_data or read_run_info(adapter).get("data_path")
    if source and (probe_data or os.path.isfile(source)):
        return load_samples(source, "You are a helpful assistant.")[:limit], source
    return BUILTIN_PROBES[:limit], "built-in"


def compare_logits(merged: list[torch.Tensor], reference: list[torch.Tensor]) -> dict:
    diffs = torch.cat([(m - r).abs().flatten() for m, r in zip(merged, reference)])
    agree = sum(int((m.argmax(-1) == r.argmax(-1)).sum()) for m, r in zip(merged, reference))
    positions = sum(m.shape[0] for m in merged)
    return {"max_abs_logit_diff": float(diffs.max()), "mean_abs_logit_diff": float(diffs.mean()),
            "top1_agreement": agree / positions, "positions": positions}


def exact_proof(merged: list[torch.Tensor], unmerged: list[torch.Tensor]) -> dict:
    """The merged model's probe logits against the unmerged adapter on the same float32 weights: they must
    agree to float round-off (EXACT_RTOL of the logits' scale)."""
    diff = max(float((m - u).abs().max()) for m, u in zip(merged, unmerged))
    scale = max(float(u.abs().max()) for u in unmerged)
    bound = EXACT_RTOL * max(scale, 1.0)
    return {"max_abs_logit_diff": diff, "bound": bound, "passed": diff <= bound}


def decisive_agreement(saved: list[torch.Tensor], kernel: list[torch.Tensor], exact: list[torch.Tensor]) -> dict:
    """Top-1 agreement of the saved model with the 4-bit-kernel adapter model, counted only where the exact
    reference's top-1 margin exceeds twice the kernels' noise (their max distance from the exact reference):
    elsewhere either token may win by rounding alone — near-ties, reported as a count."""
    noise = max(float((k - e).abs().max()) for k, e in zip(kernel, exact))
    agree = decisive = 0
    for s, k, e in zip(saved, kernel, exact):
        top2 = e.topk(2, dim=-1).values
        sure = (top2[:, 0] - top2[:, 1]) > 2 * noise
        decisive += int(sure.sum())
        agree += int(((s.argmax(-1) == k.argmax(-1)) & sure).sum())
    positions = sum(e.shape[0] for e in exact)
    return {"kernel_noise": noise, "decisive_positions": decisive, "near_ties": positions - decisive,
            "decisive_top1_agreement": agree / decisive if decisive else 1.0}


def kernel_information(saved: list[torch.Tensor], kernel: list[torch.Tensor], exact: list[torch.Tensor]) -> dict:
    """As information: the saved model against the adapter model as it trained (the base's own kernels)."""
    report = compare_logits(saved, kernel)
    report.update(decisive_agreement(saved, kernel, exact))
    report["saved_vs_exact_max_abs_logit_diff"] = max(float((a - b).abs().max()) for a, b in zip(saved, exact))
    return report


def merge(adapter: str, out: str, base: str | None = None, dtype: str = "auto",
          trust_remote_code: bool = False, probe_data: str | None = None, probe_samples: int = 8,
          max_shard_gb: float = 5.0) -> dict:
    from transformers import AutoConfig

    from qlaunch.config.files import overlap_problems
    from qlaunch.model import merge_proof as passes
    from qlaunch.model.inference import (
        adapter_base,
        adapter_tokenizer,
        load_for_inference,
        read_run_info,
        remote_code_problem,
    )
    from qlaunch.config.skeleton import without_quantization
    from qlaunch.config.machine import Machine
    from qlaunch.model.merge_stream import StreamingMerge, merge_device, output_dtype
    from qlaunch.model.shards import CheckpointReader
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
    info_run = read_run_info(adapter)
    # --base: merge into that full-precision checkpoint, as given (to compare the two routes).
    quant = None if given_base else info_run.get("quant_method")
    torch_dtype = output_dtype(dtype, base)
    # Headers, config and adapter on a meta skeleton: what cannot be merged is refused before weights load.
    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    device, why = merge_device(Machine.detect(), quant)
    streaming = StreamingMerge(base, adapter, quant, torch_dtype, config=config,
                               double_quant=info_run.get("bnb_4bit_use_double_quant", True),
                               trust_remote_code=trust_remote_code, device=device)
    print(f"merging on {device} ({why}), one tensor at a time", file=sys.stderr)
    base_files = None if quant else passes.Files(streaming.reader, streaming.model, device)
    missing = [n for n, p in streaming.model.named_parameters() if p.is_meta and base_files and n not in base_files]
    if quant or missing:  # the adapter model as it loads for inference (float32): the proof's model, GPTQ's
        # dequantizer; for a full-precision checkpoint without some of the model's weights (transformers
        # initializes those at load), the whole base, as before streaming
        model, tokenizer = load_for_inference(base, adapter, quantization=quant or "none", device=device,
                                              trust_remote_code=trust_remote_code, dtype=torch.float32)
        base_files = None
    else:  # a full-precision base: the merge's own skeleton, each module reading its weights from the files
        model, tokenizer = streaming.peft, adapter_tokenizer(adapter, base, trust_remote_code)
    if quant == "gptq":
        streaming.attach_gptq(model.get_base_model())
    into = f"dequantized {quant}" if quant else "base weights"
    info = {"adapter": os.path.abspath(adapter), "base": base, "merged_into": into, "dtype": str(torch_dtype)[6:],
            "device": device}
    with staged_output(out) as staged:  # config.json lands last: a cut-short merge is not a model
        info["files"] = streaming.write(staged, int(max_shard_gb * 2**30))
        plain = without_quantization(model.get_base_model().config)
        plain.dtype = torch_dtype
        plain.save_pretrained(staged)
        generation = getattr(model.get_base_model(), "generation_config", None)
        if generation is not None:
            generation.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        with open(os.path.join(staged, "merge_info.json"), "w") as f:
            json.dump(info, f, indent=2)
    conversations, source = probe_conversations(adapter, probe_data, probe_samples)
    batch = passes.probe_batch(tokenizer, conversations)
    saved_files = CheckpointReader(out)
    exact = passes.exact_pass(model, batch, device, base_files)
    merged, mismatched = passes.merged_pass(model, batch, device, streaming, saved_files, base_files)
    mismatched += streaming.mismatched_copies(saved_files)
    proof = exact_proof(merged, exact)
    proof.update(saved_tensors_mismatched=mismatched[:10], passed=proof["passed"] and not mismatched)
    saved = passes.saved_pass(model, batch, device, saved_files)
    # last: a GPTQ kernel repacks itself on its first forward; a full-precision base has no kernel of its own
    kernel = passes.batch_logits(model, batch, device) if base_files is None else exact
    report = kernel_information(saved, kernel, exact)
    report.update(merged_into=into, probes=source, probe_samples=len(conversations), dtype=info["dtype"],
                  files=len(info["files"]), exact=proof, within_tolerance=proof["passed"],
                  min_top1_agreement=MIN_TOP1_EXACT if quant is None and torch_dtype == torch.float32
                  else MIN_TOP1_QUANTIZED)
    with open(os.path.join(out, REPORT), "w") as f:
        json.dump(report, f, indent=2)
    info["report"] = report
    return info


def main(argv=None) -> None:
    parser = CommandParser("qlaunch.merge", MERGE, description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="adapter directory (a LoRA / Q-LoRA run's output_dir)")
    parser.add_argument("--out", required=True, help="directory for the merged model")
    parser.add_argument("--base", help="base model (default: the one recorded in the adapter)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="dtype of the merged weights (default auto: the base's own, e.g. bfloat16)")
    parser.add_argument("--max_shard_gb", type=float, default=5.0,
                        help="largest output file in GB (default 5); the model is written one tensor at a time")
    parser.add_argument("--probe_data", help="conversations to compare merged vs adapter model on "
                        "(default: the adapter's training data, else built-in prompts)")
    parser.add_argument("--probe_samples", type=int, default=8, help="how many probe conversations (default 8)")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="run code shipped with the base checkpoint (needed when training needed it)")
    args = parser.parse_args(argv)
    try:
        info = merge(args.adapter, args.out, args.base, args.dtype, args.trust_remote_code, args.probe_data,
                     args.probe_samples, args.max_shard_gb)
    except UsageError as e:
        print(e.render("qlaunch.merge"), file=sys.stderr)
        sys.exit(2)
    print(f"merged {info['adapter']} into the {info['merged_into']} of {info['base']} → {args.out} "
          f"({info['dtype']}, {len(info['files'])} file(s), written one tensor at a time)")
    r = info["report"]
    e = r["exact"]
    print(f"proof: merged vs the adapter unmerged on the same float32 weights, {r['probe_samples']} probes "
          f"({r['probes']}, {r['positions']} positions): max |logit diff| {e['max_abs_logit_diff']:.3g} "
          f"(bound {e['bound']:.3g}) → {'exact' if e['passed'] else 'FAILED'}")
    print(f"information: the saved {info['dtype']} model vs the adapter on the base's own kernels: max |logit diff| "
          f"{r['max_abs_logit_diff']:.3g}; top-1 agreement {r['decisive_top1_agreement']:.2%} of "
          f"{r['decisive_positions']} positions whose margin exceeds the kernels' noise ({r['kernel_noise']:.3g}; "
          f"{r['near_ties']} near-ties) → {os.path.join(args.out, REPORT)}")
    if not r["within_tolerance"]:
        why = (f"{len(e['saved_tensors_mismatched'])}+ saved tensors are not the merged ones "
               f"({e['saved_tensors_mismatched'][0]})" if e["saved_tensors_mismatched"] else
               f"max |logit diff| {e['max_abs_logit_diff']:.3g} > {e['bound']:.3g}")
        print(f"qlaunch.merge: error: the merged model is not the adapter model on the same weights ({why}); "
              f"do not ship it (exit {EXIT_MISMATCH}).", file=sys.stderr)
        sys.exit(EXIT_MISMATCH)
    if args.base:
        print("note: merged into the given full-precision --base, not the weights the adapter was trained against; "
              "the information line above is that choice's cost.", file=sys.stderr)


if __name__ == "__main__":
    main()
