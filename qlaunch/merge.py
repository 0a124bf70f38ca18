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

import argparse
import json
import os
import sys

import torch

from qlaunch.errors import UsageError


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

    from qlaunch.model import unquantized_config

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


def merge(adapter: str, out: str, base: str | None = None, dtype: str = "float32",
          trust_remote_code: bool = False) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlaunch.adapters import adapter_base, load_for_inference, read_run_info, remote_code_problem
    from qlaunch.model import load_tokenizer

    base = base or adapter_base(adapter)
    problem = remote_code_problem(base, adapter, trust_remote_code)
    if problem:
        raise UsageError(problem)
    quant = read_run_info(adapter).get("quant_method")
    if quant == "gptq":  # the trainable kernel keeps the packed layout that dequantize_weight() reads
        from qlaunch.gptq import gptq_training_config

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
    os.makedirs(out, exist_ok=True)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"adapter": os.path.abspath(adapter), "base": base, "merged_into": f"dequantized {quant}" if quant
            else "base weights", "dtype": dtype}
    with open(os.path.join(out, "merge_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qlaunch.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="adapter directory (a LoRA / Q-LoRA run's output_dir)")
    parser.add_argument("--out", required=True, help="directory for the merged model")
    parser.add_argument("--base", help="base model (default: the one recorded in the adapter)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="run code shipped with the base checkpoint (needed when training needed it)")
    args = parser.parse_args(argv)
    try:
        info = merge(args.adapter, args.out, args.base, args.dtype, args.trust_remote_code)
    except UsageError as e:
        print(e.render("qlaunch.merge"), file=sys.stderr)
        sys.exit(2)
    print(f"merged {info['adapter']} into the {info['merged_into']} of {info['base']} → {args.out} ({args.dtype})")


if __name__ == "__main__":
    main()
