"""Merging into the dequantized 4-bit weights reproduces the trained Q-LoRA model."""
import json
import os
import subprocess
import sys

import pytest
import torch

from qlaunch.cli import fit, prepare
from qlaunch.config.errors import UsageError

FAST = ["--max_steps", "15", "--learning_rate", "3e-3", "--per_device_train_batch_size", "8", "--save_strategy",
        "no", "--report_to", "none", "--model_max_length", "64", "--lora_r", "8", "--lora_dropout", "0",
        "--disable_tqdm", "True"]


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("kind", ["nf4", "gptq"])
def test_merged_model_matches_trained_adapter(kind, demo, tmp_path):
    from transformers import AutoModelForCausalLM

    from qlaunch.merge import merge

    model_path = demo["model"]
    if kind == "gptq":
        pytest.importorskip("gptqmodel")
        from qlaunch.model.gptq_pack import make_gptq_checkpoint

        model_path = make_gptq_checkpoint(demo["model"], str(tmp_path / "gptq"))
    out = tmp_path / "adapter"
    trainer = fit(prepare(["--model_name_or_path", model_path, "--data_path", demo["train"], "--output_dir",
                           str(out), "--q_lora", *FAST])).trainer
    ids = torch.randint(4, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    trained = logits(trainer.model, ids)

    info = merge(str(out), str(tmp_path / "merged"), dtype="float32")
    assert info["merged_into"] == f"dequantized {kind}"
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report == info["report"] and report["probes"] == demo["train"]  # the adapter's training data
    print(f"{kind} merge report: {report}")
    assert report["top1_agreement"] >= 0.99 and report["within_tolerance"] and report["positions"] > 100
    # the proof: merged vs unmerged on the same float32 dequantized weights, float round-off only
    exact = report["exact"]
    assert exact["passed"] and exact["max_abs_logit_diff"] <= exact["bound"] and exact["max_abs_logit_diff"] < 1e-4
    assert report["decisive_positions"] + report["near_ties"] == report["positions"]
    assert report["decisive_top1_agreement"] == 1.0  # where the kernels' noise cannot flip the winner
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert not hasattr(merged.config, "quantization_config")
    assert all(type(m) is torch.nn.Linear for n, m in merged.named_modules() if n.endswith("q_proj"))
    diff = (logits(merged, ids) - trained).abs().max().item()
    # The 4-bit CPU kernels compute in reduced precision (bitsandbytes dequantizes NF4 to bf16); the
    # merged model can only be as close to the trained one as the plain dequantized base is to the
    # quantized base. Measure that floor on the untrained base.
    from qlaunch.merge import plain_copy
    from qlaunch.model.inference import load_for_inference

    if kind == "nf4":
        base, _ = load_for_inference(model_path, None, quantization="nf4", device="cpu")
    else:
        from qlaunch.model.gptq import gptq_training_config, pin_training_kernels

        base = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=gptq_training_config(),
                                                    device_map={"": "cpu"}, dtype=torch.float32)
        pin_training_kernels(base)  # the fp32 training path, as the adapter was trained
    plain = plain_copy(base, torch.float32)
    floor = (logits(plain, ids) - logits(base, ids)).abs().max().item()
    print(f"{kind}: merged vs trained {diff:.2e}; kernel floor {floor:.2e}")
    assert diff <= 2 * floor + 1e-4, (diff, floor)
    original = AutoModelForCausalLM.from_pretrained(demo["model"])  # merging into these would be wrong
    assert (logits(original, ids) - trained).abs().max().item() > 3 * diff
    assert os.path.isfile(tmp_path / "merged" / "tokenizer.json")


def test_lora_merge_report_and_base_route(demo, tmp_path):
    """A LoRA merge agrees with the adapter model on >= 99.9% of next tokens; `--base` merges an NF4
    adapter into the original full-precision weights and reports the larger difference."""
    from qlaunch.merge import merge

    lora = tmp_path / "lora"
    fit(prepare(["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir", str(lora),
                 "--use_lora", *FAST]))
    before = {p.name: p.read_bytes() for p in lora.iterdir() if p.is_file()}
    for out, relation in ((lora, "is --adapter"), (lora / "merged", "is inside --adapter"),
                          (demo["model"], "is --base")):
        with pytest.raises(UsageError, match=relation):
            merge(str(lora), str(out))
    assert {p.name: p.read_bytes() for p in lora.iterdir() if p.is_file()} == before  # the adapter untouched
    report = merge(str(lora), str(tmp_path / "lora_merged"))["report"]
    assert report["top1_agreement"] >= 0.999 and report["min_top1_agreement"] == 0.999
    assert report["max_abs_logit_diff"] < 1e-3

    nf4 = tmp_path / "nf4"
    fit(prepare(["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir", str(nf4),
                 "--q_lora", *FAST]))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    routes = {}
    for name, extra in (("dequantized", []), ("given base", ["--base", demo["model"]])):
        out = tmp_path / name.replace(" ", "_")
        r = subprocess.run([sys.executable, "-m", "qlaunch.merge", "--adapter", str(nf4), "--out", str(out), *extra],
                           capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "top-1 agreement" in r.stdout
        routes[name] = json.loads((out / "merge_report.json").read_text())
    print({k: (v["top1_agreement"], v["max_abs_logit_diff"]) for k, v in routes.items()})
    assert routes["dequantized"]["max_abs_logit_diff"] < routes["given base"]["max_abs_logit_diff"]
    assert routes["given base"]["merged_into"] == "base weights"


FAULTS = ("scaling", "transposed", "wrong base")


def inject(fault: str, kind: str, monkeypatch) -> None:
    """A deliberately wrong merge: B doubled (scaling), the LoRA update transposed (square layers), or merged
    into other weights than the adapter was trained against (the base scaled by 1.01 before dequantizing)."""
    from peft.tuners.lora.layer import Linear

    from qlaunch.model.merge_stream import Dequantizer, StreamingMerge

    if fault in ("scaling", "transposed"):
        real_delta = Linear.get_delta_weight

        def delta(self, adapter):
            d = real_delta(self, adapter)
            return 2 * d if fault == "scaling" else (d.T if d.shape[0] == d.shape[1] else d)
        monkeypatch.setattr(Linear, "get_delta_weight", delta)
    elif kind == "lora":
        real_tensors = StreamingMerge.module_tensors

        def tensors(self, module):
            read = self.reader.read
            self.reader.read = lambda name: read(name) * 1.01 if name.endswith(".weight") else read(name)
            try:
                return real_tensors(self, module)
            finally:
                del self.reader.read
        monkeypatch.setattr(StreamingMerge, "module_tensors", tensors)
    else:
        real_weight = Dequantizer.weight
        monkeypatch.setattr(Dequantizer, "weight",
                            lambda self, module, reader, device: 1.01 * real_weight(self, module, reader, device))


@pytest.fixture(scope="module")
def held_out_adapters(demo, tmp_path_factory):
    """The held-out case of the issue: 5 steps at lr 5e-3, for LoRA, NF4 and GPTQ bases."""
    root = tmp_path_factory.mktemp("held_out")
    gptq = pytest.importorskip("qlaunch.model.gptq_pack").make_gptq_checkpoint(demo["model"], str(root / "gptq_base"))
    adapters = {}
    for kind, model, flag in (("lora", demo["model"], "--use_lora"), ("nf4", demo["model"], "--q_lora"),
                              ("gptq", gptq, "--q_lora")):
        adapters[kind] = str(root / kind)
        fit(prepare(["--model_name_or_path", model, "--data_path", demo["train"], "--output_dir", adapters[kind],
                     flag, *FAST, "--max_steps", "5", "--learning_rate", "5e-3"]))
    return adapters


@pytest.mark.parametrize("kind", ["lora", "nf4", "gptq"])
def test_correct_merges_pass_and_each_wrong_merge_fails_the_proof_with_exit_4(kind, held_out_adapters, tmp_path,
                                                                              monkeypatch, capsys):
    """The exact proof passes the correct float32 merge (the held-out case: NF4, 5 steps, lr 5e-3, whose
    argmax flips under the kernels' rounding) and fails each wrong one far outside float round-off: exit 4."""
    from qlaunch import merge as merge_cmd

    adapter = held_out_adapters[kind]
    merge_cmd.main(["--adapter", adapter, "--out", str(tmp_path / "right"), "--dtype", "float32"])
    right = json.loads((tmp_path / "right" / "merge_report.json").read_text())
    assert right["exact"]["passed"] and right["exact"]["max_abs_logit_diff"] < 1e-4, right["exact"]
    assert right["exact"]["saved_tensors_mismatched"] == []
    for fault in FAULTS:
        with monkeypatch.context() as patch:
            inject(fault, kind, patch)
            with pytest.raises(SystemExit) as exit_info:
                merge_cmd.main(["--adapter", adapter, "--out", str(tmp_path / fault.replace(" ", "_"))])
        err = capsys.readouterr().err
        assert exit_info.value.code == merge_cmd.EXIT_MISMATCH, (fault, err)
        assert "is not the adapter model on the same weights" in err
        report = json.loads((tmp_path / fault.replace(" ", "_") / "merge_report.json").read_text())
        exact = report["exact"]
        print(kind, fault, exact["max_abs_logit_diff"], exact["bound"])
        assert not exact["passed"] and exact["max_abs_logit_diff"] > 10 * exact["bound"], (fault, exact)
