"""finetune.py as a user runs it: bad input → one clear message, exit 2, no traceback, nothing written."""
import json
import os
import subprocess
import sys

from tests.conftest import REPO


def run_finetune(*args, cwd=REPO):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(REPO, "finetune.py"), *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def assert_usage_error(result, *needles):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr[-2000:]


def test_help_lists_qwen_and_hf_flags():
    result = run_finetune("--help")
    assert result.returncode == 0
    for flag in ("--model_name_or_path", "--data_path", "--use_lora", "--q_lora", "--lora_target_modules",
                 "--quantization", "--learning_rate", "--config", "--truncation"):
        assert flag in result.stdout


def test_malformed_data_exit_2_and_nothing_written(demo, tmp_path):
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([{"conversations": [{"from": "user", "value": "no answer"}]}]))
    out = tmp_path / "out"
    result = run_finetune("--model_name_or_path", demo["model"], "--data_path", str(data), "--output_dir", str(out),
                          "--use_lora")
    assert_usage_error(result, "record 0 has no assistant turn")
    assert not out.exists()


def test_many_problems_one_message(tmp_path):
    result = run_finetune("--data_path", str(tmp_path / "none.json"), "--lora_r", "0", "--q_lora")
    assert_usage_error(result, "problems:", "--model_name_or_path is required", "--data_path: file not found",
                       "--lora_r 0")


def test_unknown_flag(demo, tmp_path):
    result = run_finetune("--model_name_or_path", demo["model"], "--data_path", demo["train"], "--lora_rank", "8")
    assert_usage_error(result, "unknown arguments: --lora_rank")


def test_dry_run_validates_data_without_training(demo, tmp_path):
    out = tmp_path / "out"
    result = run_finetune("--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir",
                          str(out), "--use_lora", "--dry_run", "True", "--model_max_length", "30")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "truncated to 30 tokens" in result.stderr
    assert not (out / "adapter_model.safetensors").exists()


def test_every_sample_dropped_is_an_error(demo, tmp_path):
    result = run_finetune("--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir",
                          str(tmp_path / "o"), "--use_lora", "--model_max_length", "20")
    assert_usage_error(result, "every sample was dropped", "Raise --model_max_length")
    assert not (tmp_path / "o").exists()


def test_the_three_former_tracebacks_are_usage_errors(demo, tmp_path):
    """Invalid UTF-8 data, a negative learning rate and batch size 0 once ended in tracebacks (exit 1),
    the last two only after the model had loaded. Now: one message, exit 2, nothing written."""
    data = tmp_path / "latin1.json"
    data.write_bytes('[{"instruction": "Caf\u00e9?", "output": "oui"}]'.encode("latin-1"))
    out = tmp_path / "out"
    result = run_finetune("--model_name_or_path", demo["model"], "--data_path", str(data), "--output_dir", str(out),
                          "--use_lora")
    assert_usage_error(result, "latin1.json: not valid UTF-8 at byte 21 (line 1)", "Save the file as UTF-8")
    result = run_finetune("--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir",
                          str(out), "--use_lora", "--learning_rate", "-1", "--per_device_train_batch_size", "0")
    assert_usage_error(result, "2 problems", "--learning_rate -1.0: must not be negative",
                       "--per_device_train_batch_size 0: must be at least 1")
    assert "Loading" not in result.stderr and not out.exists()


def test_out_of_memory_is_one_message_with_the_plan_and_options(demo, tmp_path, capsys):
    """torch.OutOfMemoryError from a training step (what a too-large batch raises on a GPU): exit 3,
    the memory plan of this run and two re-planned options, no traceback."""
    import pytest
    import torch
    from transformers import TrainerCallback

    from qlaunch.cli import main

    class OutOfMemoryAtStep2(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    argv = ["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir", str(tmp_path / "o"),
            "--use_lora", "--max_steps", "5", "--per_device_train_batch_size", "4", "--model_max_length", "1024",
            "--report_to", "none", "--disable_tqdm", "True"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv, extra_callbacks=[OutOfMemoryAtStep2()])
    err = capsys.readouterr().err
    assert exit_info.value.code == 3
    assert "finetune.py: error: out of GPU memory (CUDA out of memory. Tried to allocate 20.00 GiB)" in err
    assert "Memory plan:" in err and "Options, re-planned" in err and "Traceback" not in err
    assert "--per_device_train_batch_size 2 --gradient_accumulation_steps 2 (same global batch)" in err or \
        "--gradient_checkpointing" in err


def test_usr1_while_tokenizing_stops_before_the_model_loads_and_requeues(demo, tmp_path, monkeypatch):
    """SLURM's warning (SIGUSR1) that arrives before training — here right as tokenizing ends — is
    recorded by the handler finetune.py installs first, and the run stops before loading the model:
    exit 0, the job requeued, nothing written (issue 24 item 3)."""
    import signal

    from qlaunch import cli
    from qlaunch.cluster.preemption import PreemptionSignals

    requeued, loaded = [], []
    monkeypatch.setattr("qlaunch.train.trainer.requeue_if_slurm", lambda: requeued.append(True) or True)
    monkeypatch.setattr("qlaunch.model.load.load_base_model", lambda *a, **k: loaded.append(True))
    tokenize = cli.load_datasets

    def tokenize_then_signal(config, tokenizer):
        datasets = tokenize(config, tokenizer)
        os.kill(os.getpid(), signal.SIGUSR1)  # what srun forwards to the job step
        return datasets

    monkeypatch.setattr(cli, "load_datasets", tokenize_then_signal)
    out = tmp_path / "out"
    signals = PreemptionSignals.install()
    try:
        outcome = cli.fit(cli.prepare(["--model_name_or_path", demo["model"], "--data_path", demo["train"],
                                       "--output_dir", str(out), "--q_lora", "--max_steps", "2"]), signals=signals)
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    assert signals.received == "SIGUSR1"
    assert outcome.status == "preempted" and outcome.exit_code == 0 and outcome.step == 0
    assert "SIGUSR1 while tokenizing, before training" in outcome.message
    assert requeued == [True] and loaded == []
    assert not (out / "adapter_model.safetensors").exists() and not list(out.glob("checkpoint-*"))


def test_the_preemption_record_is_the_first_thing_finetune_installs():
    """Before torch is imported: everything after can take minutes on a large model."""
    import ast
    import inspect

    from qlaunch import cli

    body = ast.parse(inspect.getsource(cli.main)).body[0].body
    first = next(node for node in body if not isinstance(node, ast.Expr))  # after the docstring
    assert "PreemptionSignals.install()" in ast.unparse(first)
