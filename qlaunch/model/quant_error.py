"""What 4 bits cost on your model: per-layer errors of GPTQ, NF4 and FP4 side by side.

For every projection GPTQ quantized, against the full-precision weight W:
- weight error: ||W_q - W||_F / ||W||_F
- output error on the calibration activations X: ||X (W_q - W)^T||_F / ||X W^T||_F, computed from the
  Gram matrix H = X^T X of the full-precision model's inputs to that layer (one forward pass over the
  calibration samples; every format is measured on the same inputs)
- stored bits per parameter, quantization state included (GPTQ: qweight + qzeros + scales + g_idx;
  NF4/FP4 as finetune.py --q_lora loads them: bitsandbytes, block 64, double quantization).
GPTQ is read back from the saved checkpoint (the artifact that ships). RTN (round-to-nearest on GPTQ's
grid, no calibration) is listed too: the gap to it is what GPTQ's calibration buys.

Memory: one in_features^2 float32 matrix per projection (about 0.9 GB per Llama-7B block) on top of
the float32 model.
"""
from __future__ import annotations

import json
import os

import torch

FORMATS = ("gptq", "nf4", "fp4", "rtn")
SHOWN = ("gptq", "nf4", "fp4")  # the PNG's formats; RTN is a reference, not a choice
NF4_BLOCKSIZE = 64  # bitsandbytes' default, which finetune.py's BitsAndBytesConfig uses
REPORT_JSON, REPORT_PNG = "quant_report.json", "quant_report.png"


def read_gptq_layers(quantized_dir: str) -> dict[str, dict[str, torch.Tensor]]:
    """{layer name: {qweight, qzeros, scales, g_idx}} of a saved GPTQ checkpoint (any number of shards)."""
    from safetensors import safe_open

    layers: dict[str, dict[str, torch.Tensor]] = {}
    for name in sorted(os.listdir(quantized_dir)):
        if not name.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(quantized_dir, name), framework="pt") as f:
            for key in f.keys():
                prefix, _, leaf = key.rpartition(".")
                if leaf in ("qweight", "qzeros", "scales", "g_idx"):
                    layers.setdefault(prefix, {})[leaf] = f.get_tensor(key)
    return layers


def input_grams(model, names: list[str], calibration: list[dict]) -> dict[str, torch.Tensor]:
    """H = X^T X of each named linear's inputs over the calibration samples (full-precision forward)."""
    modules = dict(model.named_modules())
    grams = {n: torch.zeros(modules[n].in_features, modules[n].in_features) for n in names}

    def hook(name):
        def accumulate(_module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            grams[name].addmm_(x.t(), x)
        return accumulate

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        model.eval()
        with torch.no_grad():
            for sample in calibration:
                model(input_ids=torch.tensor([sample["input_ids"]]))
    finally:
        for h in handles:
            h.remove()
    return grams


def gptq_weight(tensors: dict, bits: int) -> tuple[torch.Tensor, float]:
    """Dequantized [out, in] weight and stored bits/param of one GPTQ v1 layer."""
    from qlaunch.model.gptq_pack import dequantize_gptq_v1

    weight = dequantize_gptq_v1(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], bits)
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    return weight, 8 * stored / weight.numel()


def rtn_weight(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round-to-nearest on GPTQ's symmetric grid (same groups, no calibration)."""
    from qlaunch.model.gptq_pack import quantize_rtn_sym

    group = weight.shape[1] if group_size == -1 else group_size
    codes, scales, zero = quantize_rtn_sym(weight, bits, group)
    g_idx = torch.arange(weight.shape[1]) // group
    return (scales.float()[g_idx] * (codes - zero).float()).t()


def bnb_weight(weight: torch.Tensor, quant_type: str) -> tuple[torch.Tensor, float]:
    """bitsandbytes NF4/FP4 (double quantization) round trip of a weight, and its stored bits/param."""
    import bitsandbytes as bnb

    from qlaunch.model.footprint import linear4bit_storage

    out_f, in_f = weight.shape
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32, compress_statistics=True,
                              quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, compress_statistics=True,
                                     quant_type=quant_type, blocksize=NF4_BLOCKSIZE)._quantize("cpu")
    dequantized = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    return dequantized, linear4bit_storage(layer)["bits_per_param"]


def errors(weight: torch.Tensor, quantized: torch.Tensor, gram: torch.Tensor) -> dict:
    diff = quantized - weight
    # ||X D^T||_F^2 = tr(D H D^T) = sum((D H) * D)
    out_err = ((diff @ gram) * diff).sum().clamp_min(0) / ((weight @ gram) * weight).sum()
    return {"weight_error": float(diff.norm() / weight.norm()), "output_error": float(out_err.sqrt())}


def layer_row(name: str, weight: torch.Tensor, gram: torch.Tensor, gptq: dict, bits: int, group_size: int) -> dict:
    row = {"layer": name, "shape": list(weight.shape), "params": weight.numel()}
    quantized, gptq_bits = gptq_weight(gptq, bits)
    row["gptq"] = {**errors(weight, quantized, gram), "bits_per_param": gptq_bits}
    row["rtn"] = {**errors(weight, rtn_weight(weight, bits, group_size), gram), "bits_per_param": gptq_bits}
    for quant_type in ("nf4", "fp4"):
        quantized, stored = bnb_weight(weight, quant_type)
        row[quant_type] = {**errors(weight, quantized, gram), "bits_per_param": stored}
    return row


def summarize(rows: list[dict]) -> dict:
    """Parameter-weighted means over all layers, per format."""
    params = sum(r["params"] for r in rows)
    summary = {}
    for fmt in FORMATS:
        summary[fmt] = {key: sum(r[fmt][key] * r["params"] for r in rows) / params
                        for key in ("weight_error", "output_error", "bits_per_param")}
    summary["lowest_output_error"] = min(SHOWN, key=lambda f: summary[f]["output_error"])
    return summary


def build_report(model_dir: str, quantized_dir: str, calibration: list[dict], bits: int, group_size: int,
                 trust_remote_code: bool = False) -> dict:
    from transformers import AutoModelForCausalLM

    gptq_layers = read_gptq_layers(quantized_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    modules = dict(model.named_modules())
    names = [n for n in modules if n in gptq_layers]  # model order
    missing = sorted(set(gptq_layers) - set(names))
    if missing:
        raise RuntimeError(f"quantized layers not found in {model_dir}: {', '.join(missing[:5])}")
    grams = input_grams(model, names, calibration)
    rows = [layer_row(n, modules[n].weight.detach().float(), grams.pop(n), gptq_layers[n], bits, group_size)
            for n in names]
    return {"model": os.path.abspath(model_dir), "bits": bits, "group_size": group_size,
            "calibration_samples": len(calibration),
            "calibration_tokens": sum(len(s["input_ids"]) for s in calibration),
            "nf4_fp4": {"blocksize": NF4_BLOCKSIZE, "double_quant": True},
            "layers": rows, "summary": summarize(rows)}


def format_table(report: dict) -> str:
    head = (f"{'layer':<34} {'shape':>10}  {'output error':^31}  {'weight error':^31}\n"
            f"{'':<34} {'':>10}  " + " ".join(f"{f.upper():>7}" for f in FORMATS) + "  "
            + " ".join(f"{f.upper():>7}" for f in FORMATS))
    lines = [head]

    def cells(entry: dict, key: str) -> str:
        return " ".join(f"{entry[f][key]:>7.4f}" for f in FORMATS)

    for r in report["layers"]:
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"{r['layer'][-34:]:<34} {shape:>10}  {cells(r, 'output_error')}  {cells(r, 'weight_error')}")
    s = report["summary"]
    lines.append(f"{'all layers (parameter-weighted)':<34} {'':>10}  {cells(s, 'output_error')}  "
                 f"{cells(s, 'weight_error')}")
    lines.append(f"{'stored bits/param':<34} {'':>10}  " + " ".join(f"{s[f]['bits_per_param']:>7.3f}" for f in FORMATS))
    lines.append(f"relative errors; output error on {report['calibration_tokens']} calibration tokens. "
                 f"Lowest output error: {s['lowest_output_error'].upper()}. RTN = GPTQ's grid without calibration.")
    return "\n".join(lines)


def print_table(report: dict) -> None:
    print(format_table(report))


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["layers"]
    x = range(len(rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.35 * len(rows) + 2), 7), sharex=True)
    for ax, key in zip(axes, ("output_error", "weight_error")):
        for fmt in SHOWN:
            ax.plot(x, [r[fmt][key] for r in rows], marker="o", markersize=3,
                    label=f"{fmt.upper()} ({report['summary'][fmt]['bits_per_param']:.2f} bits/param)")
        ax.set_ylabel(f"relative {key.replace('_', ' ')}")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[0].set_title(f"{os.path.basename(report['model'])}: error per layer, {report['bits']}-bit GPTQ "
                      f"(group {report['group_size']}) vs NF4 / FP4")
    axes[1].set_xticks(list(x), [r["layer"].replace("model.layers.", "") for r in rows], rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: dict, out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    json_path, png_path = os.path.join(out_dir, REPORT_JSON), os.path.join(out_dir, REPORT_PNG)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    plot(report, png_path)
    return [json_path, png_path]
