"""kill -9 at every file boundary of the final save: what is left never loads unless it is the verified adapter.

A counting run (the uninterrupted reference) lists every file operation under --output_dir from the start
of the final save on (tests/integration/_hooks/kill_at_save: written files, renames, removals, directories);
then one run per boundary is killed just before that operation. Each leftover directory must either hold
the complete adapter, equal to the reference's (the move into place had reached adapter_config.json, which
lands last), or have no adapter_config.json — plain peft refuses it, and so do `qlaunch.chat`,
`qlaunch.merge` and `qlaunch.evaluate`; running the same command again into it completes, equal to the
reference.
"""
from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from launchkit import HOOKS, REPO, base_env, max_abs_diff

pytestmark = pytest.mark.integration


def finetune(demo, out, **env) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(REPO / "finetune.py"), "--model_name_or_path", str(demo["model"]), "--data_path",
            str(demo["data"]), "--output_dir", str(out), "--use_lora", "True", "--max_steps", "1",
            "--per_device_train_batch_size", "2", "--save_strategy", "no", "--report_to", "none", "--seed", "42"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=str(REPO),
                          env=base_env(PYTHONPATH=HOOKS / "kill_at_save", QLAUNCH_TEST_KILL_DIR=out, **env))


def adapter(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def peft_loads(demo, path) -> bool:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(demo["model"]))
    try:
        PeftModel.from_pretrained(base, str(path))
    except (ValueError, OSError):
        return False
    return True


@pytest.fixture(scope="module")
def killed(launch_demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("final_save_kill")
    log = root / "boundaries.txt"
    reference = finetune(launch_demo, root / "reference", QLAUNCH_TEST_KILL_LOG=log)
    assert reference.returncode == 0, reference.stderr[-3000:]
    boundaries = log.read_text().splitlines()
    # one kill per distinct moment: consecutive repeats of one operation on one path change nothing between them
    picks = [i + 1 for i, line in enumerate(boundaries) if i == 0 or line.split()[1:] != boundaries[i - 1].split()[1:]]

    def kill_at(k):
        out = root / f"kill-{k:02d}"
        return k, out, finetune(launch_demo, out, QLAUNCH_TEST_KILL_AT=str(k))

    with ThreadPoolExecutor(max_workers=2) as pool:  # two single-threaded runs on two cores
        runs = list(pool.map(kill_at, picks))
    return {"reference": root / "reference", "boundaries": boundaries, "runs": runs}


def test_every_boundary_leaves_the_verified_adapter_or_nothing_that_loads(killed, launch_demo):
    boundaries, reference = killed["boundaries"], adapter(killed["reference"])
    assert len(boundaries) >= 15, boundaries  # staging writes, the moves into place, the reports
    assert any("adapter_config.json" in b and "os.rename" in b for b in boundaries), boundaries
    loadable = []
    for k, out, run in killed["runs"]:
        assert run.returncode == -9, (k, boundaries[k - 1], run.returncode, run.stderr[-2000:])
        if (out / "adapter_config.json").exists():
            assert max_abs_diff(adapter(out), reference) == 0.0, (k, boundaries[k - 1])
            loadable.append(k)
        else:
            assert not peft_loads(launch_demo, out), (k, boundaries[k - 1])
    # the adapter becomes loadable exactly once adapter_config.json has moved in, and stays so
    moved = next(i + 1 for i, b in enumerate(boundaries) if "os.rename" in b and "adapter_config.json" in b)
    assert loadable == [k for k, _, _ in killed["runs"] if k > moved], (loadable, moved)
    print(f"{len(killed['runs'])} kills at {len(boundaries)} boundaries; loadable after boundary {moved} only")


def test_the_tools_refuse_an_adapter_killed_while_moving_in_and_a_rerun_completes(killed, launch_demo, tmp_path):
    boundaries = killed["boundaries"]
    moved = next(i + 1 for i, b in enumerate(boundaries) if "os.rename" in b and "adapter_config.json" in b)
    out = next(out for k, out, _ in killed["runs"] if k == moved)  # every file in place but adapter_config.json
    assert (out / "adapter_model.safetensors").exists() and not (out / "adapter_config.json").exists()
    env = base_env()
    for module, args in (("qlaunch.chat", ["--adapter", out, "--prompt", "hi"]),
                         ("qlaunch.merge", ["--adapter", out, "--out", tmp_path / "merged"]),
                         ("qlaunch.evaluate", ["--adapter", out, "--data", launch_demo["data"]])):
        r = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                           cwd=str(REPO), env=env, timeout=300)
        assert r.returncode == 2, (module, r.returncode, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and "adapter_config.json" in r.stderr, (module, r.stderr[-2000:])
    assert not (tmp_path / "merged").exists()
    again = finetune(launch_demo, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert max_abs_diff(adapter(out), adapter(killed["reference"])) == 0.0
    assert not (out / ".staging-final").exists()
