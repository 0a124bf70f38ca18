"""Bad numbers generated from the declared domains (qlaunch.config.domains), not written case by case.

For every numeric flag of finetune.py: NaN, ±inf, 0, -1, a huge value and a wrong type, on the command
line and in a YAML recipe. Every candidate outside the flag's domain must end as the README promises:
exit 2, one error naming the flag, no traceback, nothing created, the inputs' bytes unchanged and no
weights read (from_pretrained is watched). Candidates inside the domain are skipped, not assumed bad.
"""
from __future__ import annotations

import hashlib
import os

import pytest

from qlaunch.config.domains import FINETUNE

CLI_VALUES = ["nan", "inf", "-inf", "0", "-1", "1e30", "abc"]
YAML_VALUES = [".nan", ".inf", "-.inf", "0", "-1", "1.0e+30", "abc", "true", "[8]"]


def _parsed(kind, text: str):
    try:
        return kind(text)
    except ValueError:
        return ValueError  # argparse refuses it


def _yaml(text: str):
    import yaml

    return yaml.safe_load(f"v: {text}")["v"]


def cases():
    for flag, domain in FINETUNE.items():
        for text in CLI_VALUES:
            value = _parsed(domain.kind, text)
            if value is ValueError or not domain.contains(value):
                yield pytest.param(flag, "cli", text, id=f"{flag}-cli-{text}")
        for text in YAML_VALUES:
            value = _yaml(text)
            if isinstance(value, str):  # argparse converts string defaults with the flag's type
                value = _parsed(domain.kind, value)
            if value is ValueError or not domain.contains(value):
                yield pytest.param(flag, "yaml", text, id=f"{flag}-yaml-{text}")


CASES = list(cases())


def digest(*paths) -> str:
    h = hashlib.sha256()
    for path in paths:
        files = [os.path.join(root, f) for root, _, names in os.walk(path) for f in sorted(names)] \
            if os.path.isdir(path) else [path]
        for f in sorted(files):
            with open(f, "rb") as fh:
                h.update(f.encode() + fh.read())
    return h.hexdigest()


def test_the_generated_corpus_covers_every_declared_flag():
    assert {c.values[0] for c in CASES} == set(FINETUNE)
    assert len(CASES) >= 250, len(CASES)


@pytest.mark.parametrize("flag, where, text", CASES)
def test_a_value_outside_the_declared_domain_is_refused_before_loading(flag, where, text, demo, tmp_path, capsys,
                                                                       monkeypatch):
    from transformers.modeling_utils import PreTrainedModel

    from qlaunch.cli import main

    monkeypatch.setattr(os, "environ", dict(os.environ))  # main() may set rank variables
    loads = []
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a)))
    out = tmp_path / "run"
    before = digest(demo["model"], demo["train"])
    argv = ["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir", str(out),
            "--use_lora", "--report_to", "none"]
    if where == "cli":
        argv += [f"--{flag}", text]
    else:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(f"{flag}: {text}\n")
        argv += ["--config", str(recipe)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    assert "Traceback" not in err and err.count("finetune.py: error:") == 1, err[-2000:]
    assert f"--{flag}" in err or f"--{flag.replace('_', '-')}" in err, err[-2000:]
    assert not out.exists() and not loads
    assert digest(demo["model"], demo["train"]) == before


def command_cases():
    from qlaunch.config.domains import CHAT, EVALUATE, MERGE, QUANTIZE

    for command, domains in (("merge", MERGE), ("quantize", QUANTIZE), ("chat", CHAT), ("evaluate", EVALUATE)):
        for flag, domain in domains.items():
            for text in CLI_VALUES:
                value = _parsed(domain.kind, text)
                if value is ValueError or not domain.contains(value):
                    yield pytest.param(command, flag, text, id=f"{command}-{flag}-{text}")


COMMAND_CASES = list(command_cases())


@pytest.mark.parametrize("command, flag, text", COMMAND_CASES)
def test_every_command_refuses_numbers_outside_their_domain_in_one_line(command, flag, text, demo, tmp_path, capsys,
                                                                        monkeypatch):
    """merge, quantize, chat and evaluate declare their numeric flags too. merge, chat and evaluate check
    them as the flags are parsed, before any file is read (their paths here do not even exist); quantize
    with its other checks, so that every problem is reported at once (its inputs here are valid)."""
    import importlib

    from transformers.modeling_utils import PreTrainedModel

    loads = []
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a)))
    out = tmp_path / "out"
    rest = {"merge": ["--adapter", str(tmp_path / "a"), "--out", str(out)],
            "quantize": ["--model", demo["model"], "--data", demo["train"], "--out", str(out)],
            "chat": ["--adapter", str(tmp_path / "a"), "--prompt", "hi"],
            "evaluate": ["--adapter", str(tmp_path / "a"), "--data", str(tmp_path / "d.json")]}[command]
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"qlaunch.{command}").main([*rest, f"--{flag}", text])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"qlaunch.{command}: error: ") and f"--{flag}" in lines[0], err
    assert not out.exists() and not loads


@pytest.mark.parametrize("text", ["soon", "nan", "-1", "inf", "1e400"])
def test_a_signal_lead_outside_its_domain_is_refused_before_loading(text, demo, tmp_path, capsys, monkeypatch):
    """The environment values qlaunch reads (qlaunch/config/environment.py) get the flags' treatment."""
    from transformers.modeling_utils import PreTrainedModel

    from qlaunch.cli import main

    monkeypatch.setenv("QLAUNCH_SIGNAL_LEAD", text)  # the real environment: some readers bound it at import
    monkeypatch.setattr(os, "environ", dict(os.environ))  # main() may set rank variables
    loads = []
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a)))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir", str(out),
              "--use_lora", "--report_to", "none"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and err.count("finetune.py: error:") == 1, err[-2000:]
    assert f"QLAUNCH_SIGNAL_LEAD={text!r}" in err and not out.exists() and not loads
