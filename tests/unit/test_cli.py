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
