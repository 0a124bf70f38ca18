"""Library lines that ask nothing of the user never reach the console (issue 24 item 10)."""
from __future__ import annotations

import logging
import subprocess
import sys

from qlaunch.config.console import NO_ACTION, NO_ACTION_WARNINGS, quiet_libraries
from tests.conftest import REPO


def test_only_the_declared_lines_are_demoted_and_they_stay_in_debug(caplog):
    quiet_libraries()
    quiet_libraries()  # idempotent
    assert all(sum(type(f).__name__ == "_Demote" for f in logging.getLogger(n).filters) == 1 for n in NO_ACTION)
    shown = []

    class Keep(logging.Handler):
        def emit(self, record):
            shown.append(record.getMessage())

    torchao = logging.getLogger("torchao")
    torchao.addHandler(Keep())
    try:
        with caplog.at_level(logging.DEBUG, logger="qlaunch"):
            logging.getLogger("qlaunch").propagate = True
            torchao.warning("Failed to load /x/_C_mxfp8.so: Could not load this library")
            torchao.warning("quantization config is invalid")  # anything else goes through untouched
    finally:
        torchao.handlers.clear()
        logging.getLogger("qlaunch").propagate = False
    assert shown == ["quantization config is invalid"]
    assert any("torchao: Failed to load /x/_C_mxfp8.so" in r.getMessage() and r.levelno == logging.DEBUG
               for r in caplog.records)


def test_a_qlora_run_and_an_evaluation_print_no_library_line_that_needs_no_action(demo, tmp_path):
    """The demo's commands (make demo runs them): a Q-LoRA run with gradient checkpointing and an
    evaluation. Their stderr holds none of the demoted lines and no FutureWarning."""
    env = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    runs = [
        [sys.executable, "finetune.py", "--model_name_or_path", demo["model"], "--data_path", demo["train"], "--q_lora",
         "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--report_to", "none",
         "--per_device_train_batch_size", "2", "--activation_checkpointing", "True"],
        [sys.executable, "-m", "qlaunch.evaluate", "--base", demo["model"], "--data", demo["eval"], "--limit", "1",
         "--show", "0"],
    ]
    for argv in runs:
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for fragments in NO_ACTION.values():
            for fragment in fragments:
                assert fragment not in proc.stderr, (argv[1], fragment)
        assert "FutureWarning" not in proc.stderr, proc.stderr[-3000:]
        assert not [pattern for _, pattern in NO_ACTION_WARNINGS if pattern.strip("`") in proc.stderr]
