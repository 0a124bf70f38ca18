"""Atomic checkpoints, resume that skips incomplete ones, and the read-back check of the final adapter."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlaunch.cli import fit, prepare
from qlaunch.train.checkpoints import STAGING, newest_complete_checkpoint


def args(demo, out, *extra):
    return ["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir", str(out),
            "--use_lora", "--lora_r", "4", "--lora_dropout", "0", "--max_steps", "6", "--save_strategy", "steps",
            "--save_steps", "2", "--save_total_limit", "2", "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "True",
            "--model_max_length", "64", "--seed", "3", *extra]


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("atomic")
    outcome = fit(prepare(args(demo, out)))
    assert outcome.status == "done"
    return outcome, out


def test_checkpoints_are_renamed_into_place_and_rotated(trained):
    _, out = trained
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]  # limit 2
    assert not (out / STAGING).exists() and not (out / ".staging-final").exists()
    for ckpt in out.glob("checkpoint-*"):
        names = {p.name for p in ckpt.iterdir()}
        assert {"trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
                "rng_state.pth"} <= names


def test_final_adapter_verifies_and_corruption_is_caught(trained, tmp_path):
    from qlaunch.train.verify import verify_saved_adapter

    outcome, out = trained
    model = outcome.trainer.model
    assert verify_saved_adapter(model, str(out)) == []

    truncated = tmp_path / "truncated"
    shutil.copytree(out, truncated, ignore=shutil.ignore_patterns("checkpoint-*"))
    path = truncated / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    [problem] = verify_saved_adapter(model, str(truncated))
    assert "cannot be read back" in problem and "truncated or corrupt" in problem

    zeroed = tmp_path / "zeroed"
    shutil.copytree(out, zeroed, ignore=shutil.ignore_patterns("checkpoint-*"))
    tensors = load_file(str(zeroed / "adapter_model.safetensors"))
    name = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, str(zeroed / "adapter_model.safetensors"), metadata={"format": "pt"})
    [problem] = verify_saved_adapter(model, str(zeroed))
    assert name in problem and "differ from the trained ones" in problem

    dropped = tmp_path / "dropped"
    shutil.copytree(out, dropped, ignore=shutil.ignore_patterns("checkpoint-*"))
    tensors.pop(name)
    save_file(tensors, str(dropped / "adapter_model.safetensors"), metadata={"format": "pt"})
    assert any("missing" in p for p in verify_saved_adapter(model, str(dropped)))

    # What FSDP's checkpoint wrapper did: peft found no adapter, the file held none, and "nothing
    # missing, nothing extra" passed. An empty expectation beside trainable parameters fails now.
    empty = tmp_path / "empty"
    shutil.copytree(out, empty, ignore=shutil.ignore_patterns("checkpoint-*"))
    save_file({}, str(empty / "adapter_model.safetensors"), metadata={"format": "pt"})
    [problem] = verify_saved_adapter(model, str(empty), expected={})
    assert "peft finds no adapter tensors" in problem


def test_a_corrupted_final_save_fails_the_run_with_exit_1(demo, tmp_path, monkeypatch):
    """The file is damaged between writing and the rename (a disk or filesystem fault): exit code 1."""
    from qlaunch.train import checkpoints

    real = checkpoints.fsync_tree

    def damaging_fsync(path):
        target = os.path.join(path, "adapter_model.safetensors")
        if path.endswith(checkpoints.FINAL_STAGING) and os.path.exists(target):
            tensors = load_file(target)
            first = sorted(tensors)[0]
            tensors[first] = torch.zeros_like(tensors[first])
            save_file(tensors, target, metadata={"format": "pt"})
        real(path)

    monkeypatch.setattr(checkpoints, "fsync_tree", damaging_fsync)
    outcome = fit(prepare(args(demo, tmp_path / "o", "--save_strategy", "no", "--max_steps", "2")))
    assert outcome.status == "verify_failed" and outcome.exit_code == 1
    assert "does not match the trained model" in outcome.message
    assert not (tmp_path / "o" / "metrics.json").exists()  # no report for an adapter that is not what trained
    # nothing loadable was published: the read-back happens before adapter_config.json lands
    assert not (tmp_path / "o" / "adapter_config.json").exists()
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()
    assert (tmp_path / "o" / checkpoints.FINAL_STAGING / "adapter_model.safetensors").exists()  # kept to inspect


def test_resume_skips_incomplete_checkpoints_and_staging_leftovers(tmp_path, caplog):
    def checkpoint(path, complete=True):
        path.mkdir(parents=True)
        (path / "adapter_model.safetensors").write_bytes(b"x")
        if complete:
            (path / "trainer_state.json").write_text(json.dumps({"global_step": 1}))

    checkpoint(tmp_path / "checkpoint-2")
    checkpoint(tmp_path / "checkpoint-10", complete=False)  # e.g. written by a version without staging
    checkpoint(tmp_path / STAGING / "checkpoint-12")  # killed before the rename
    with caplog.at_level("WARNING", logger="qlaunch"):
        assert newest_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    text = caplog.text
    assert "checkpoint-12: a checkpoint interrupted while being written" in text
    assert "checkpoint-10: incomplete" in text
    assert not (tmp_path / STAGING).exists()
    assert newest_complete_checkpoint(str(tmp_path / "nothing")) is None


def test_killed_after_the_last_checkpoint_resumes_without_an_extra_step(demo, tmp_path):
    """Killed between the last checkpoint and the final save: the resumed run saves that checkpoint's
    adapter (transformers' train() would run one step past max_steps)."""
    out = tmp_path / "run"
    first = fit(prepare(args(demo, out)))
    final = load_file(str(out / "adapter_model.safetensors"))
    for name in os.listdir(out):  # what the kill took: everything but the checkpoints
        if not name.startswith("checkpoint-"):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = fit(prepare(args(demo, out, "--resume_from_checkpoint", "auto")))
    assert resumed.status == "done" and resumed.trainer.state.global_step == 6
    assert max(h["step"] for h in resumed.trainer.state.log_history if "loss" in h) == 6
    again = load_file(str(out / "adapter_model.safetensors"))
    assert again.keys() == final.keys() and all(torch.equal(again[k], final[k]) for k in final)
    assert first.trainer.state.global_step == 6


def test_staged_output_moves_a_complete_result_and_leaves_nothing_of_a_failed_one(tmp_path, monkeypatch):
    from qlaunch.train import checkpoints
    from qlaunch.train.checkpoints import staged_output

    out = tmp_path / "model"
    with staged_output(str(out)) as staged:
        for name, text in (("config.json", "new"), ("model.safetensors", "weights"), ("tokenizer.json", "t")):
            (tmp_path / "model" / os.path.basename(staged) / name).write_text(text)
        assert not (out / "config.json").exists()  # nothing in place while it is written
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]

    with pytest.raises(RuntimeError):
        with staged_output(str(tmp_path / "failed")) as staged:
            (tmp_path / "failed" / os.path.basename(staged) / "model.safetensors").write_text("half")
            raise RuntimeError("killed mid-save")
    assert os.listdir(tmp_path / "failed") == []

    # A move cut short over an earlier result: the old config.json is gone first, so the directory
    # is incomplete (not old metadata beside new weights).
    moved = []
    real_replace = os.replace

    def replace_then_fail(src, dst):
        if moved:
            raise OSError("disk full")
        moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(checkpoints.os, "replace", replace_then_fail)
    with pytest.raises(OSError):
        with staged_output(str(out)) as staged:
            for name in ("config.json", "model.safetensors", "tokenizer.json"):
                (out / os.path.basename(staged) / name).write_text("newer")
    assert "config.json" not in os.listdir(out)
