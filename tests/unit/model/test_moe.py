"""MoE bases: experts counted before loading, 4-bit refused where the experts would stay 16-bit, LoRA on the
fused experts through peft's target_parameters, the router's auxiliary loss in the trained loss."""
import json

import pytest
import torch

from qlaunch.cli import fit, prepare
from qlaunch.config.errors import UsageError
from qlaunch.memory.planner import memory_plan
from tests.moe_models import KINDS, build_moe

FAST = ["--max_steps", "3", "--learning_rate", "1e-2", "--per_device_train_batch_size", "4", "--save_strategy", "no",
        "--report_to", "none", "--model_max_length", "64", "--lora_dropout", "0", "--disable_tqdm", "True"]
EXPERTS = ["--lora_target_parameters", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def moe(demo, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("moe"))
    return {kind: build_moe(kind, root, demo["model"]) for kind in KINDS}


@pytest.mark.parametrize("kind", list(KINDS))
def test_experts_are_counted_on_the_meta_skeleton(kind, moe):
    from transformers import AutoModelForCausalLM

    from qlaunch.config.checkpoint import read_config
    from qlaunch.config.moe import experts_of

    experts = experts_of(moe[kind], read_config(moe[kind]))
    model = AutoModelForCausalLM.from_pretrained(moe[kind])
    fused = {n: p.numel() for n, p in model.named_parameters() if ".experts." in n and p.dim() == 3}
    assert experts.experts == 4 and experts.per_token == 2
    assert experts.fused_tensors == len(fused) == 2 * 2  # gate_up_proj and down_proj in each of 2 layers
    assert experts.fused_params == sum(fused.values())
    assert experts.total_params == sum(p.numel() for p in model.parameters())
    assert experts.active_params == experts.total_params - experts.fused_params // 2  # 2 of 4 experts unused
    assert set(experts.names) == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}


def test_4bit_on_fused_experts_is_refused_with_what_stays_16_bit(moe, demo, tmp_path):
    from qlaunch.config.moe import count_experts, fused_experts_problem, meta_skeleton
    from tests.model_dims import DIMS, config_dir

    for kind in KINDS:
        with pytest.raises(UsageError) as refused:
            prepare(["--model_name_or_path", moe[kind], "--data_path", demo["train"], "--output_dir",
                     str(tmp_path / kind), "--q_lora", *FAST])
        text = " ".join(refused.value.problems)
        assert "fused 3-D parameters, not nn.Linear" in text and "--use_lora" in text, text
        assert not (tmp_path / kind).exists()
    # Qwen3-30B-A3B, from its published dimensions: 128 experts of 3 x 2048 x 768 in 48 layers stay 16-bit
    path = config_dir("Qwen/Qwen3-30B-A3B", str(tmp_path), prefer_shared=False)
    experts = count_experts(DIMS["Qwen/Qwen3-30B-A3B"], meta_skeleton(path))
    assert experts.fused_params == 48 * 128 * 3 * 2048 * 768
    assert 30.4e9 < experts.total_params < 30.6e9 and 3.2e9 < experts.active_params < 3.4e9  # "30B-A3B"
    text = fused_experts_problem(experts, "nf4")
    assert "29B parameters (95% of the model), 58GB" in text, text


def test_lora_on_the_experts_changes_their_outputs_and_needs_no_dropout(moe, demo, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with pytest.raises(UsageError, match="pass --lora_dropout 0"):
        prepare(["--model_name_or_path", moe["qwen3_moe"], "--data_path", demo["train"], "--output_dir",
                 str(tmp_path / "x"), "--use_lora", *EXPERTS, *FAST, "--lora_dropout", "0.05"])
    with pytest.raises(UsageError, match="--lora_target_parameters mlp.nothing: no parameter of that name"):
        prepare(["--model_name_or_path", moe["qwen3_moe"], "--data_path", demo["train"], "--output_dir",
                 str(tmp_path / "x"), "--use_lora", "--lora_target_parameters", "mlp.nothing", *FAST])
    out = tmp_path / "adapter"
    config = prepare(["--model_name_or_path", moe["qwen3_moe"], "--data_path", demo["train"], "--output_dir",
                      str(out), "--use_lora", *EXPERTS, *FAST])
    planned = memory_plan(config)
    trainer = fit(config).trainer
    # the plan counts LoRA on the experts (peft's ParamWrapper: r·experts per matrix) exactly as peft builds it
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    on_experts = sum(p.numel() for n, p in trainer.model.named_parameters() if p.requires_grad and ".experts." in n)
    assert on_experts > 0 and planned["lora_parameters"] == planned["trainable_parameters"] == trained
    assert sorted(json.loads((out / "adapter_config.json").read_text())["target_parameters"]) == sorted(EXPERTS[1:])
    model = trainer.model.eval()
    block = model.get_base_model().model.layers[0].mlp
    hidden = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = block(hidden)
        adapted = adapted[0] if isinstance(adapted, tuple) else adapted
        with model.disable_adapter():
            plain = block(hidden)
            plain = plain[0] if isinstance(plain, tuple) else plain
    assert (adapted - plain).abs().max() > 1e-4  # the block has no attention: only the experts' LoRA acts
    # the adapter loads with plain peft on the plain base and computes the same logits
    ids = torch.arange(5, 25).unsqueeze(0)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moe["qwen3_moe"]), str(out)).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_the_routers_auxiliary_loss_is_in_the_trained_loss(moe, demo, tmp_path):
    """With output_router_logits (as the model's config defines it) the loss qlaunch's Trainer optimizes is
    cross-entropy + router_aux_loss_coef x the load-balancing loss, not cross-entropy alone."""
    import torch.nn.functional as F

    from qlaunch.cli import load_datasets, load_model
    from qlaunch.model.load import load_tokenizer
    from qlaunch.train.trainer import build_trainer

    config = prepare(["--model_name_or_path", moe["mixtral"], "--data_path", demo["train"], "--output_dir",
                      str(tmp_path / "aux"), "--use_lora", *FAST])
    tokenizer = load_tokenizer(moe["mixtral"])
    train, _ = load_datasets(config, tokenizer)
    model, _ = load_model(config)
    trainer = build_trainer(config, model, tokenizer, train)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        out = model(**batch)
    logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    coef = model.config.router_aux_loss_coef
    assert out.aux_loss is not None and out.aux_loss > 0
    assert abs(float(loss) - float(ce + coef * out.aux_loss)) < 1e-5, (float(loss), float(ce), float(out.aux_loss))
    assert abs(float(loss) - float(ce)) > 0.5 * coef * float(out.aux_loss)


@pytest.mark.parametrize("kind", list(KINDS))
def test_zero3_marks_each_sparse_block_a_leaf(kind, moe):
    from deepspeed.utils import z3_leaf_module
    from transformers import AutoModelForCausalLM

    from qlaunch.model.moe_blocks import zero3_leaf_moe_blocks

    model = AutoModelForCausalLM.from_pretrained(moe[kind])
    names = zero3_leaf_moe_blocks(model)
    blocks = [m for m in model.modules() if hasattr(m, "experts")]
    assert len(names) == 1 and names[0].endswith("SparseMoeBlock") and len(blocks) == 2
    assert all(z3_leaf_module(m) for m in blocks)
    assert not any(z3_leaf_module(m) for m in model.modules() if m not in blocks)
    assert zero3_leaf_moe_blocks(model.model.layers[0].self_attn) == []  # no experts: nothing marked


# published sizes (model cards): total and active parameters, in billions; Qwen's 3.3B is given to two digits
PUBLISHED = {"Qwen/Qwen3-30B-A3B": (30.5, 3.3, 0.02), "mistralai/Mixtral-8x7B-Instruct-v0.1": (46.7, 12.9, 0.01)}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_plan_of_published_moe_architectures_on_1_and_8_gpus(name, tmp_path, capsys):
    """python -m qlaunch.plan on a config.json written from the published architecture: total and active
    parameters as published (within 1%; Qwen3's active 3.35B is 1.6% above its two-digit 3.3B), and a
    per-device plan for 1 and 8 GPUs under ZeRO-3 in which each GPU holds 1/8 of the base."""
    from qlaunch.plan import main as plan_main
    from tests.conftest import REPO
    from tests.model_dims import config_dir

    total, active, tolerance = PUBLISHED[name]
    path = config_dir(name, str(tmp_path), prefer_shared=False)
    reports = {}
    for gpus in ("1", "8"):
        plan_main(["--model_name_or_path", path, "--use_lora", "--gpu", "H100-80GB", "--num_gpus", gpus,
                       "--deepspeed", f"{REPO}/ds_configs/zero3.json", "--gradient_checkpointing", "True",
                       "--model_max_length", "2048", "--per_device_train_batch_size", "1", "--json"])
        reports[gpus] = report = json.loads(capsys.readouterr().out)
        moe = report["experts"]
        assert moe["parameters"] == report["parameters"]
        assert abs(moe["parameters"] / 1e9 / total - 1) < 0.01, moe
        assert abs(moe["active_parameters"] / 1e9 / active - 1) < tolerance, moe
    one, eight = (reports[g]["memory_gb"] for g in ("1", "8"))
    assert reports["1"]["parameters"] == reports["8"]["parameters"]
    assert abs(one["persistent"]["base weights"] / eight["persistent"]["base weights"] - 8) < 0.01
    assert eight["per_device_peak"] < one["per_device_peak"]
