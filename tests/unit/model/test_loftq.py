"""--init_lora_weights loftq (qlaunch.model.loftq): the adapter starts at the rank-r SVD of each layer's 4-bit
quantization error, so an NF4 model starts closer to its full-precision base; it trains, reloads with plain
peft on a fresh NF4 base and merges with merge's own proof. Refused where it cannot apply, before loading."""
from __future__ import annotations

import pytest
import torch

from qlaunch.model.loftq import low_rank_factors, svd_device
from tests.unit.model.test_lora import lora_args, reload_logit_diff


def test_scaled_factors_are_the_truncated_svd():
    residual = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    for rank, scaling in ((4, 2.0), (8, 0.5), (32, 1.0)):
        a, b = low_rank_factors(residual, rank, scaling)
        assert a.shape == (rank, 32) and b.shape == (48, rank)
        best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        assert torch.allclose(scaling * b @ a, best, atol=1e-5)  # the adapter's update, scaling included
    a, b = low_rank_factors(residual, 32, 3.0)
    assert torch.allclose(3.0 * b @ a, residual, atol=1e-5)  # full rank: the error itself
    assert svd_device(True) == "cuda" and svd_device(False) == "cpu"


def test_loftq_on_nf4_starts_closer_trains_reloads_and_merges(demo, tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from qlaunch.cli import fit, load_model, prepare
    from qlaunch.merge import merge

    ids = torch.arange(5, 37).unsqueeze(0)
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(demo["model"], dtype=torch.float32)(input_ids=ids).logits
    errors = {}
    for init in ("true", "loftq"):
        model, _ = load_model(prepare(lora_args(demo, tmp_path / init, "--q_lora", "--init_lora_weights", init)))
        with torch.no_grad():
            errors[init] = (model.eval()(input_ids=ids).logits - reference).abs().mean().item()
    print("mean |logit error| against the full-precision model at initialisation:", errors)
    assert errors["loftq"] < 0.9 * errors["true"], errors

    out = tmp_path / "trained"
    outcome = fit(prepare(lora_args(demo, out, "--q_lora", "--init_lora_weights", "loftq")))
    assert outcome.status == "done", outcome.message
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    assert reload_logit_diff(outcome.trainer.model, out, demo["model"]) <= 1e-4
    info = merge(str(out), str(tmp_path / "merged"))
    assert info["merged_into"] == "dequantized nf4" and info["report"]["within_tolerance"], info["report"]


@pytest.mark.parametrize("extra, message", [
    (["--use_lora"], "add --q_lora True"),
    (["--q_lora", "--use_dora", "True"], "with --use_dora"),
    (["--q_lora", "--deepspeed", "ds_configs/zero3.json"], "with ZeRO-3 or FSDP2: not supported yet"),
])
def test_loftq_refused_where_it_cannot_apply(demo, tmp_path, extra, message):
    from qlaunch.cli import prepare
    from qlaunch.config.errors import UsageError
    from tests.conftest import REPO

    extra = [f"{REPO}/{a}" if a.startswith("ds_configs/") else a for a in extra]
    with pytest.raises(UsageError) as e:
        prepare(lora_args(demo, tmp_path / "x", "--init_lora_weights", "loftq", *extra))
    assert message in " ".join(e.value.problems)
