"""The README's commands, run as a user would (litgpt-style)."""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = open(os.path.join(REPO, "README.md")).read()


def test_readme_names_the_two_commands_and_ci_runs_the_test_one():
    assert re.search(r"^make demo\b", README, re.M) and re.search(r"^make test\b", README, re.M)
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    assert re.search(r"^make test\b", ci, re.M)


@pytest.mark.integration
@pytest.mark.slow
def test_make_demo_learns(tmp_path):
    """`make demo` (with this interpreter's venv standing in for .venv): the adapter learns."""
    venv = sys.prefix
    result = subprocess.run(["make", "demo", f"VENV={venv}", f"DEMO_DIR={tmp_path}/demo"], cwd=REPO,
                            capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "The fine-tuned adapter learned." in result.stdout
    table = re.search(r"exact match \(held-out\)\s+([\d.]+)%\s+([\d.]+)%", result.stdout)
    before, after = float(table.group(1)), float(table.group(2))
    assert after >= 50.0 > before


@pytest.mark.integration
def test_readme_finetune_commands_parse(tmp_path):
    """Every `python finetune.py ...` line in the README runs its preflight (--dry_run) on the demo."""
    from qlaunch.demo import build_demo

    demo = build_demo(str(tmp_path / "demo"))
    lines = [l.split("#")[0].strip() for l in README.splitlines() if l.startswith("python finetune.py")]
    assert lines
    for line in lines:
        args = line.split()[2:]
        args = [demo["model"] if a == "M" else demo["train"] if a == "D" else a for a in args]
        if "--dry_run" not in args:
            args += ["--dry_run", "True"]
        result = subprocess.run([sys.executable, "finetune.py", *args, "--output_dir", str(tmp_path / "o")],
                                cwd=REPO, capture_output=True, text=True, timeout=300,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert result.returncode == 0, (line, result.stderr[-2000:])
