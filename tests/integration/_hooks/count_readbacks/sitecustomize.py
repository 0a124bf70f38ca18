"""Test-only hook (put this directory on PYTHONPATH): count host read-backs inside non-logging steps.

When QLAUNCH_TEST_READBACK_LOG is set, once `qlaunch.train.trainer` is imported, `torch.Tensor.item` and
`.tolist` are wrapped, and build_trainer adds a callback that marks the steps after the first whose
control says neither log nor save. Each read-back from qlaunch, transformers, accelerate, peft or DeepSpeed
code inside such a step is counted by its caller; at the end of training every rank appends
{"rank", "steps", "calls"} as one JSON line to that file. Agreement flags (callbacks.any_ranks) are not
counted: they are CPU tensors on a CPU process group by construction (callbacks.control_group_backend)."""
import json
import os
import sys
from collections import Counter

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # _hooks/
from on_import import PatchOnImport  # noqa: E402

WATCHED = ("/qlaunch/", "/transformers/", "/accelerate/", "/peft/", "/deepspeed/")


def _patch(module) -> None:
    import torch
    from transformers import TrainerCallback

    state = {"active": False, "steps": 0, "calls": Counter(), "step_calls": Counter()}

    def wrap(name, original):
        def counted(tensor, *args, **kwargs):
            if state["active"]:
                caller = sys._getframe(1).f_code
                if any(p in caller.co_filename for p in WATCHED) and caller.co_name != "any_ranks":
                    state["step_calls"][f"{name} in {caller.co_filename.rsplit('/', 2)[-1]}:{caller.co_name}"] += 1
            return original(tensor, *args, **kwargs)
        return counted

    for name in ("item", "tolist"):
        setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state_, control, **kwargs):
            state["active"] = state_.global_step >= 1

        def on_step_end(self, args, state_, control, **kwargs):
            # DefaultFlowCallback ran first: control says whether this step logs or saves
            if state["active"] and not (control.should_log or control.should_save):  # a logging step may read
                state["steps"] += 1
                state["calls"].update(state["step_calls"])
            state["step_calls"].clear()
            state["active"] = False

        def on_train_end(self, args, state_, control, **kwargs):
            with open(os.environ["QLAUNCH_TEST_READBACK_LOG"], "a") as f:
                f.write(json.dumps({"rank": int(os.environ.get("RANK", "0")), "steps": state["steps"],
                                    "calls": dict(state["calls"])}) + "\n")

    original = module.build_trainer

    def build_trainer(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.add_callback(Steps())
        return trainer

    module.build_trainer = build_trainer


if os.environ.get("QLAUNCH_TEST_READBACK_LOG"):
    sys.meta_path.insert(0, PatchOnImport("qlaunch.train.trainer", _patch))
