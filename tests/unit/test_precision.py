"""Each precision rule: its exact message, decided in one place."""
import torch

from qlaunch import precision as P
from qlaunch.precision import resolve_precision


def test_cpu_runs_fp32_and_says_so():
    for quant in (None, "nf4", "gptq"):
        r = resolve_precision(quant, fp16=True, bf16=False, cuda=False)
        assert (r.compute_dtype, r.fp16, r.bf16, r.problems) == (torch.float32, False, False, [])
        assert r.notes == [P.CPU_NOTE]
        assert "training on CPU in float32" in r.notes[0] and "ignores fp16" in r.notes[0]


def test_gptq_bf16_is_an_error_with_the_fix():
    r = resolve_precision("gptq", fp16=False, bf16=True, cuda=True, cuda_bf16=True)
    assert r.problems == [P.GPTQ_BF16]
    assert "pass --fp16 True instead of --bf16 True" in r.problems[0]


def test_gptq_defaults_to_fp16_on_gpu():
    r = resolve_precision("gptq", fp16=False, bf16=False, cuda=True, cuda_bf16=True)
    assert (r.compute_dtype, r.fp16, r.notes) == (torch.float16, True, [P.GPTQ_FP16_DEFAULT])
    r = resolve_precision("gptq", fp16=True, bf16=False, cuda=True, cuda_bf16=False)
    assert (r.compute_dtype, r.fp16, r.notes, r.problems) == (torch.float16, True, [], [])


def test_nf4_prefers_bf16_and_warns_on_fp16():
    r = resolve_precision("nf4", fp16=False, bf16=True, cuda=True, cuda_bf16=True)
    assert (r.compute_dtype, r.bf16, r.warnings) == (torch.bfloat16, True, [])
    r = resolve_precision("nf4", fp16=True, bf16=False, cuda=True, cuda_bf16=True)
    assert r.compute_dtype == torch.float16 and r.warnings == [P.NF4_FP16_WARN]
    assert "prefer --bf16 True" in r.warnings[0]


def test_bf16_on_gpu_without_bf16():
    r = resolve_precision("nf4", fp16=False, bf16=True, cuda=True, cuda_bf16=False)
    assert r.problems == [P.NO_GPU_BF16]


def test_both_flags():
    assert resolve_precision(None, True, True, cuda=True, cuda_bf16=True).problems == [P.BOTH]


def test_full_precision_lora_follows_flags():
    assert resolve_precision(None, False, True, cuda=True, cuda_bf16=True).compute_dtype == torch.bfloat16
    assert resolve_precision(None, False, False, cuda=True, cuda_bf16=True).compute_dtype == torch.float32


def test_cpu_note_reaches_the_log(demo, tmp_path):
    from qlaunch.cli import prepare

    config = prepare(["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir",
                      str(tmp_path), "--q_lora", "--fp16", "True"])
    assert P.CPU_NOTE in config.notes and config.training.fp16 is False
