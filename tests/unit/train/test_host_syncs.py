"""No host-device synchronisation in a training step that is not a logging step (issue 23): every
`.item()` / `.tolist()` that qlaunch, transformers, accelerate or peft call inside such a step is counted
(on a GPU each one blocks the host until the device has caught up). Token counts accumulate on the device
and are read back when logged (qlaunch.train.metrics.TrainedTokenCountMixin)."""
from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch
from transformers import TrainerCallback

from qlaunch.cli import fit, prepare

WATCHED = ("/qlaunch/", "/transformers/", "/accelerate/", "/peft/")


class CountReadbacks(TrainerCallback):
    """Counts read-backs from watched code between the start and the end of the steps after the first."""

    def __init__(self):
        self.active = False
        self.calls: Counter = Counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self.active = state.global_step >= 1  # the first step may set things up once

    def on_step_end(self, args, state, control, **kwargs):
        self.active = False

    def wrap(self, name, original):
        def counted(tensor, *args, **kwargs):
            if self.active:
                caller = sys._getframe(1).f_code
                if any(part in caller.co_filename for part in WATCHED):
                    self.calls[f"{name} in {caller.co_filename.rsplit('/', 2)[-1]}:{caller.co_name}"] += 1
            return original(tensor, *args, **kwargs)
        return counted


@pytest.mark.parametrize("packing", ["False", "True"])
def test_ten_non_logging_steps_read_nothing_back(demo, tmp_path, monkeypatch, packing):
    counter = CountReadbacks()
    for name in ("item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counter.wrap(name, getattr(torch.Tensor, name)))
    config = prepare(["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir",
                      str(tmp_path / packing), "--use_lora", "--max_steps", "11", "--logging_steps", "100",
                      "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True",
                      "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                      "--model_max_length", "64", "--packing", packing])
    outcome = fit(config, extra_callbacks=[counter])
    assert outcome.exit_code == 0
    assert not counter.calls, dict(counter.calls)
    # and the counts still arrive, at the end-of-training log
    assert outcome.trainer.state.num_input_tokens_seen > 0 and outcome.trainer.trained_tokens_seen > 0
