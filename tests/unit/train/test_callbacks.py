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
    assert "became nan at step 7" in guard.message() and "Lower --learning_rate" in guard.message()


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
