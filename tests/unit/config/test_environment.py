"""The environment values qlaunch reads declare their domains (qlaunch/config/environment.py); bad ones end
the launcher and finetune.py with one line and exit 2 before anything starts (generated cases)."""
from __future__ import annotations

import os

import pytest

from qlaunch.config.environment import (
    LAUNCH_VARIABLES,
    RANK_VARIABLES,
    integer_variable_problems,
    rank_variable_problems,
)

def cases(domains):
    for name, (low, high) in domains.items():
        for text in ("abc", "-1", "1.5", "0x10", str(low - 1) if low > 0 else " ", str(high + 1) if high else "1e3"):
            yield pytest.param(name, text, id=f"{name}={text}")


@pytest.mark.parametrize("name, text", list(cases(LAUNCH_VARIABLES)))
def test_the_launcher_refuses_a_bad_environment_value(name, text, capsys, monkeypatch):
    from qlaunch.launch import main

    monkeypatch.setattr(os, "environ", {**{k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES},
                                        name: text, "QLAUNCH_PRINT_ONLY": "1"})
    with pytest.raises(SystemExit) as exit_info:
        main(["-m", "m", "-d", "d.json"], method="lora", mode="dist")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert f"{name}={text!r}: must be a whole number" in err and "Traceback" not in err, err


@pytest.mark.parametrize("name, text", list(cases(RANK_VARIABLES)))
def test_finetune_refuses_a_bad_rank_variable_in_one_line(name, text, demo, tmp_path, capsys, monkeypatch):
    from qlaunch.cli import main

    monkeypatch.setattr(os, "environ", {**os.environ, name: text})
    with pytest.raises(SystemExit) as exit_info:
        main(["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir",
              str(tmp_path / "o"), "--use_lora"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    assert f"{name}={text!r}: must be a whole number" in err and not (tmp_path / "o").exists(), err


def test_good_values_and_a_rank_outside_its_world():
    assert integer_variable_problems({"NNODES": "2", "MASTER_PORT": "29500", "MAX_RESTARTS": "0"}, LAUNCH_VARIABLES) == []
    assert rank_variable_problems({"RANK": "1", "WORLD_SIZE": "2"}) == []
    assert rank_variable_problems({"RANK": "2", "WORLD_SIZE": "2"}) == [
        "RANK=2 of WORLD_SIZE=2: a rank must be below the world size; let the launcher set them."]
