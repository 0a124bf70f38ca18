"""Test-only hook (put this directory on PYTHONPATH): one rank fails at the start of training.

When QLAUNCH_TEST_FAIL_RANK=R is set, `qlaunch.train.trainer.train_or_finish` raises a RuntimeError
on the process with RANK=R only, after the model is loaded and every rank has joined the world:
an error of one rank, as an OOM or a node's full disk would be.
"""
import os
import sys

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # _hooks/
from on_import import PatchOnImport  # noqa: E402


def _patch(module) -> None:
    if os.environ.get("RANK", "0") != os.environ["QLAUNCH_TEST_FAIL_RANK"]:
        return

    def fail(trainer, resume):
        raise RuntimeError(f"injected failure on rank {os.environ['RANK']}")

    module.train_or_finish = fail


if os.environ.get("QLAUNCH_TEST_FAIL_RANK"):
    sys.meta_path.insert(0, PatchOnImport("qlaunch.train.trainer", _patch))
