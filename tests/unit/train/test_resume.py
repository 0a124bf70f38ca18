"""Preemption (SIGUSR1) checkpoints and stops; --resume_from_checkpoint auto finishes bit-identically."""
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from qlaunch.cli import fit, prepare


class SignalAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def args(demo, out, *extra):
    return ["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir", str(out),
            "--use_lora", "--lora_r", "4", "--max_steps", "12", "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-3", "--save_strategy", "no", "--logging_steps", "1", "--report_to", "none",
            "--disable_tqdm", "True", "--model_max_length", "64", "--seed", "3", *extra]


def test_preempt_then_resume_matches_uninterrupted_run(demo, tmp_path):
    straight = fit(prepare(args(demo, tmp_path / "straight"))).trainer
    assert straight.state.global_step == 12

    out = tmp_path / "preempted"
    first = fit(prepare(args(demo, out)), extra_callbacks=[SignalAt(5)])
    assert first.status == "preempted" and "SIGUSR1" in first.message and first.exit_code == 0
    assert first.trainer.state.global_step == first.step == 6  # finishes the step in flight, then stops
    assert (out / "checkpoint-6").is_dir()
    assert not (out / "adapter_model.safetensors").exists()  # the final adapter is not written on preemption
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)

    resumed = fit(prepare(args(demo, out, "--resume_from_checkpoint", "auto"))).trainer
    assert resumed.state.global_step == 12
    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_auto_resume_without_checkpoint_starts_fresh(demo, tmp_path):
    trainer = fit(prepare(args(demo, tmp_path, "--resume_from_checkpoint", "auto", "--max_steps", "2"))).trainer
    assert trainer.state.global_step == 2


def test_ranks_that_cannot_see_rank_0s_checkpoint_are_named():
    from qlaunch.train.trainer import unseen_checkpoint_problem

    assert unseen_checkpoint_problem(None, [True, False]) is None  # a fresh start needs nothing
    assert unseen_checkpoint_problem("out/checkpoint-2", [True, True, True]) is None
    one = unseen_checkpoint_problem("out/checkpoint-2", [True, False, True])
    assert one.startswith("--resume_from_checkpoint: rank 1 cannot see 'out/checkpoint-2'")
    many = unseen_checkpoint_problem("out/checkpoint-2", [True, True, False, False, False])
    assert "rank 2 and 2 more cannot see" in many


def test_one_process_resolves_and_checks_the_resume_checkpoint_itself(tmp_path):
    from qlaunch.config.errors import UsageError
    from qlaunch.train.trainer import agreed_resume

    assert agreed_resume(None, str(tmp_path)) is None
    assert agreed_resume("auto", str(tmp_path)) is None  # nothing to resume from: a fresh start
    with pytest.raises(UsageError, match="rank 0 cannot see"):
        agreed_resume(str(tmp_path / "missing"), str(tmp_path))


class SignalInsideStep(TrainerCallback):
    """SIGUSR1 after the first micro-step of the step that follows global step `step`."""

    def __init__(self, step):
        self.step, self.micro = step, 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.micro = 0

    def on_substep_end(self, args, state, control, **kwargs):
        self.micro += 1
        if state.global_step == self.step and self.micro == 1:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_a_lead_shorter_than_a_step_stops_inside_it_and_resumes_as_if_stopped_at_its_start(demo, tmp_path,
                                                                                            monkeypatch):
    """QLAUNCH_SIGNAL_LEAD=0: no step and save fit in the warning's lead, so the run stops at the first
    micro-step after the signal, drops the partial accumulation and puts the random state back to the step's
    start: resumed, it ends bit-identical to an uninterrupted run — with dropout, which draws from that state."""
    monkeypatch.setenv("QLAUNCH_SIGNAL_LEAD", "0")
    accumulating = ("--max_steps", "5", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4",
                    "--lora_dropout", "0.3")
    straight = fit(prepare(args(demo, tmp_path / "straight", *accumulating))).trainer
    assert straight.state.global_step == 5

    out = tmp_path / "preempted"
    first = fit(prepare(args(demo, out, *accumulating)), extra_callbacks=[SignalInsideStep(2)])
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    assert first.status == "preempted" and first.step == 2 and first.trainer.state.global_step == 2
    assert "inside step 3, after 2 of its 4 micro-steps, which were dropped" in first.message
    assert (out / "checkpoint-2").is_dir() and not (out / "adapter_model.safetensors").exists()

    resumed = fit(prepare(args(demo, out, *accumulating, "--resume_from_checkpoint", "auto"))).trainer
    assert resumed.state.global_step == 5
    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_preemption_lead_decisions():
    from qlaunch.cluster.preemption import lead_too_short, stop_mid_step
    from qlaunch.config.environment import signal_lead

    assert signal_lead({}) == (None, None) and signal_lead({"QLAUNCH_SIGNAL_LEAD": "120"}) == (120.0, None)
    for bad in ("soon", "nan", "-5", "inf"):
        lead, problem = signal_lead({"QLAUNCH_SIGNAL_LEAD": bad})
        assert lead is None and problem.startswith(f"QLAUNCH_SIGNAL_LEAD={bad!r}: ")
    assert lead_too_short(120, 60, 30) is None  # a 60 s step and a 30 s save fit in 120 s
    warning = lead_too_short(120, 300, 40)  # the 70B recipe on one GPU: minutes per step
    assert "one optimizer step takes 300 s and a checkpoint save 40 s" in warning and "USR1@510" in warning
    # 90 s left: 3 micro-steps of 20 s + a 40 s save do not fit, 2 do
    assert stop_mid_step(90, 3, 20, 40) and not stop_mid_step(90, 2, 20, 40)
