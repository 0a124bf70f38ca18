"""Each precision rule: its exact message, decided in one place from passed-in device facts."""
import pytest
import torch

from qlaunch.config import precision as P
from qlaunch.config.machine import CPU, gpu
from qlaunch.config.precision import resolve_precision

A100, H100, V100, T4 = gpu((8, 0), "A100"), gpu((9, 0), "H100"), gpu((7, 0), "V100"), gpu((7, 5), "T4")


def test_cpu_runs_fp32_and_says_so():
    for quant in (None, "nf4", "gptq"):
        r = resolve_precision(quant, fp16=True, bf16=False, machine=CPU)
        assert (r.compute_dtype, r.fp16, r.bf16, r.problems) == (torch.float32, False, False, [])
        assert r.notes == [P.CPU_NOTE]
        assert "training on CPU in float32" in r.notes[0] and "ignores fp16" in r.notes[0]


@pytest.mark.parametrize("quant", [None, "nf4", "fp4"])
def test_auto_is_bf16_on_ampere_and_newer(quant):
    for machine in (A100, H100):
        r = resolve_precision(quant, False, False, machine=machine)
        assert (r.compute_dtype, r.fp16, r.bf16, r.problems) == (torch.bfloat16, False, True, [])
        assert r.tf32 is True and P.TF32_NOTE in r.notes


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_auto_is_fp16_below_capability_8(quant):
    # torch.cuda.is_bf16_supported() says True on V100/T4 through emulation: the rule uses capability.
    for machine in (V100, T4):
        r = resolve_precision(quant, False, False, machine=machine)
        assert (r.compute_dtype, r.fp16, r.bf16, r.problems, r.warnings) == (torch.float16, True, False, [], [])
        assert r.tf32 is None  # transformers raises on --tf32 True without Ampere
        assert any("Precision auto: fp16" in n for n in r.notes)


def test_explicit_flags_win_and_fp32_is_available():
    assert resolve_precision(None, True, False, machine=A100).compute_dtype == torch.float16
    r = resolve_precision(None, False, False, machine=A100, precision="fp32")
    assert (r.compute_dtype, r.fp16, r.bf16) == (torch.float32, False, False)
    assert resolve_precision(None, False, False, machine=A100, precision="fp16").fp16 is True
    assert resolve_precision(None, False, False, machine=A100, tf32=False).tf32 is False


def test_precision_flag_contradicting_amp_flag():
    r = resolve_precision(None, True, False, machine=A100, precision="bf16")
    assert r.problems == [P.CONFLICT.format(precision="bf16", flag="fp16")]


def test_gptq_bf16_on_a_gpu_that_has_it_and_fp32_is_an_error_with_the_fix():
    r = resolve_precision("gptq", fp16=False, bf16=True, machine=A100)
    assert (r.compute_dtype, r.fp16, r.bf16, r.problems) == (torch.bfloat16, False, True, [])
    assert P.GPTQ_BF16_NOTE in r.notes
    assert resolve_precision("gptq", False, True, machine=V100).problems == [P.NO_GPU_BF16]  # no bf16 on Volta
    assert resolve_precision("gptq", False, False, machine=A100, precision="fp32").problems == [P.GPTQ_FP32]


def test_gptq_defaults_to_fp16_on_gpu():
    for machine in (A100, V100):
        r = resolve_precision("gptq", fp16=False, bf16=False, machine=machine)
        assert (r.compute_dtype, r.fp16, r.bf16) == (torch.float16, True, False)
        assert P.GPTQ_FP16_DEFAULT in r.notes
    r = resolve_precision("gptq", fp16=True, bf16=False, machine=V100)
    assert (r.compute_dtype, r.fp16, r.notes, r.problems) == (torch.float16, True, [], [])


def test_nf4_prefers_bf16_and_warns_on_fp16():
    r = resolve_precision("nf4", fp16=False, bf16=True, machine=A100)
    assert (r.compute_dtype, r.bf16, r.warnings) == (torch.bfloat16, True, [])
    r = resolve_precision("nf4", fp16=True, bf16=False, machine=A100)
    assert r.compute_dtype == torch.float16 and r.warnings == [P.NF4_FP16_WARN]
    assert "prefer --bf16 True" in r.warnings[0]
    # Below Ampere fp16 is the only choice: no advice to use what the GPU lacks.
    assert resolve_precision("nf4", fp16=True, bf16=False, machine=V100).warnings == []


def test_bf16_on_gpu_without_bf16():
    r = resolve_precision("nf4", fp16=False, bf16=True, machine=V100)
    assert r.problems == [P.NO_GPU_BF16]
    assert resolve_precision(None, False, False, machine=T4, precision="bf16").problems == [P.NO_GPU_BF16]


def test_both_flags():
    assert resolve_precision(None, True, True, machine=A100).problems == [P.BOTH]


def test_settings_carry_gpu_precision_into_training_arguments(demo):
    """The resolved settings for an A100 set bf16 + tf32 for the Trainer (built here without a GPU)."""
    from qlaunch.config.arguments import parse_namespace
    from qlaunch.config.resolve import resolve

    ns = parse_namespace(["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--use_lora"])
    settings = resolve(ns, A100)
    assert settings.problems == [] and settings.compute_dtype == torch.bfloat16
    assert (settings.training["bf16"], settings.training["fp16"], settings.training["tf32"]) == (True, False, True)
    assert "use_cpu" not in settings.training
    v100 = resolve(ns, V100)
    assert (v100.training["fp16"], v100.training["tf32"]) == (True, None)
    assert ns.fp16 is False and ns.bf16 is False  # resolving does not change the parsed arguments


def test_cpu_note_reaches_the_log(demo, tmp_path):
    from qlaunch.cli import prepare

    config = prepare(["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir",
                      str(tmp_path), "--q_lora", "--fp16", "True"])
    assert P.CPU_NOTE in config.notes and config.training.fp16 is False
