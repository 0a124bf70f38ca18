"""--resume_from_checkpoint checked from metadata before loading (qlaunch/config/resume.py): what `auto` would
pick is checked like an explicit path, and picking never changes the output directory."""
from __future__ import annotations

import json

from qlaunch.config.resume import newest_checkpoint, requested, resume_problems


def make(root, step: int, r: int | None = 8, state: str | None = None, weights: bool = True):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(state if state is not None else json.dumps({"global_step": step}))
    if weights:
        (path / "adapter_model.safetensors").write_bytes(b"")
    if r is not None:
        (path / "adapter_config.json").write_text(json.dumps({"r": r}))
    return path


def test_values_that_mean_no_resume_auto_or_a_path():
    assert [requested(v) for v in (None, "", False, "False", "none")] == [None] * 5
    assert [requested(v) for v in ("auto", "True", "last")] == ["auto"] * 3
    assert requested("out/checkpoint-4") == "out/checkpoint-4"


def test_auto_checks_the_newest_complete_checkpoint(tmp_path):
    make(tmp_path, 2, r=8)
    make(tmp_path, 4, r=16)
    make(tmp_path, 6, weights=False)  # incomplete: auto skips it
    assert newest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    problems = resume_problems("auto", str(tmp_path), lora_r=8)
    assert len(problems) == 1 and "picks" in problems[0] and "checkpoint-4" in problems[0] and "r=16" in problems[0]
    assert resume_problems("auto", str(tmp_path), lora_r=16) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_auto_without_checkpoints_starts_fresh(tmp_path):
    assert resume_problems("auto", str(tmp_path / "new"), lora_r=8) == []
    assert resume_problems(None, str(tmp_path), lora_r=8) == []


def test_a_full_fine_tuning_checkpoint_has_no_rank_to_compare(tmp_path):
    path = make(tmp_path, 3, r=4)
    assert resume_problems(str(path), None, lora_r=None) == []


def test_a_trainer_state_without_an_integer_step_is_damaged(tmp_path):
    for i, state in enumerate(['{"global_step": "3"}', '{"global_step": true}', "[1]", '{"global_step": -1}']):
        path = make(tmp_path / str(i), 3, state=state)
        assert "not a Trainer state" in resume_problems(str(path), None, lora_r=8)[0], state
