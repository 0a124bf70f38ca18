"""The non-finite loss guard stops a diverging run with exit code 1 and a message saying what to change."""
import math

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState

from qlaunch.cli import prepare, run
from qlaunch.train.callbacks import NonFiniteLossGuard


def test_guard_stops_on_nan_and_explains():
    guard, state, control = NonFiniteLossGuard(), TrainerState(), TrainerControl()
    state.global_step = 7
    guard.on_log(None, state, control, logs={"loss": 1.5})
    assert not control.should_training_stop
    guard.on_log(None, state, control, logs={"loss": math.nan})
    assert control.should_training_stop and guard.bad_step == 7
    assert "became nan at step 7" in guard.message() and "lower --learning_rate" in guard.message()


class PoisonAt(TrainerCallback):
    """Make a LoRA weight infinite at one step, as a diverging run would."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("inf"))


def test_diverging_run_stops_and_exits_1(demo, tmp_path):
    config = prepare(["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir",
                      str(tmp_path), "--use_lora", "--max_steps", "20", "--logging_steps", "1", "--report_to", "none",
                      "--save_strategy", "no", "--disable_tqdm", "True", "--model_max_length", "64"])
    assert run(config, extra_callbacks=[PoisonAt(3)]) == 1
    assert not (tmp_path / "adapter_model.safetensors").exists()  # nothing half-trained is saved


class PoisonAfterFirstUpdate(TrainerCallback):
    """An optimizer step that overflows the weights: the loss logged for that step was computed before it."""

    def __init__(self):
        self.done = False

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.done:
            self.done = True
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_A" in n)[0, 0] = float("nan")


def test_no_checkpoint_is_written_with_non_finite_weights(demo, tmp_path):
    """save_steps 1: the checkpoint of the step whose update broke the weights is not written; exit 1 with a
    message naming the weights and the learning rate (issue 19)."""
    from qlaunch.cli import fit

    config = prepare(["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir",
                      str(tmp_path), "--use_lora", "--max_steps", "5", "--logging_steps", "10", "--report_to", "none",
                      "--save_strategy", "steps", "--save_steps", "1", "--disable_tqdm", "True",
                      "--model_max_length", "64"])
    outcome = fit(config, extra_callbacks=[PoisonAfterFirstUpdate()])
    assert outcome.exit_code == 1 and outcome.status == "non_finite"
    assert "trainable weights became nan at step 1 (no checkpoint was written with them)" in outcome.message
    assert "--learning_rate" in outcome.message
    assert not list(tmp_path.glob("checkpoint-*")) and not (tmp_path / "adapter_config.json").exists()


def test_weights_broken_after_the_last_logged_step_stop_the_final_save(demo, tmp_path):
    """No logging or saving step after the bad update (logging_steps 10 > max_steps 3): the end-of-training
    check still stops the run with exit 1 before the final save, naming the weights and the learning rate."""
    from qlaunch.cli import fit

    config = prepare(["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir",
                      str(tmp_path), "--use_lora", "--max_steps", "3", "--logging_steps", "10", "--report_to", "none",
                      "--save_strategy", "no", "--disable_tqdm", "True", "--model_max_length", "64"])
    outcome = fit(config, extra_callbacks=[PoisonAfterFirstUpdate()])
    assert outcome.exit_code == 1 and outcome.status == "non_finite"
    assert "trainable weights became nan at step 3" in outcome.message and "--learning_rate" in outcome.message
    assert not (tmp_path / "adapter_config.json").exists() and not (tmp_path / ".staging-final").exists()
