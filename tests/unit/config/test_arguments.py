"""Parser, YAML recipes, CLI overrides, unknown keys and validate_args."""
import pytest

from qlaunch.cli import prepare
from qlaunch.config.arguments import parse_namespace
from qlaunch.config.errors import UsageError
from qlaunch.config.machine import CPU
from qlaunch.config.resolve import resolve
from qlaunch.config.validate import validate_args


def base_args(demo, *extra):
    return ["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir", "/tmp/x", *extra]


def test_yaml_recipe_and_cli_override(demo, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("use_lora: true\nlearning_rate: 1.0e-4\nlora_r: 8\nlora_target_modules: q_proj,v_proj\n")
    config = prepare(base_args(demo, "--config", str(recipe), "--learning_rate", "5e-4"))
    assert config.training.learning_rate == 5e-4  # CLI wins
    assert config.lora.lora_r == 8  # from YAML
    assert config.lora.use_lora is True
    assert config.lora.lora_target_modules == ["q_proj", "v_proj"]  # comma string split


def test_target_modules_as_list_or_comma_string(demo):
    ns = parse_namespace(base_args(demo, "--lora_target_modules", "q_proj", "k_proj,v_proj"))
    assert ns.lora_target_modules == ["q_proj", "k_proj", "v_proj"]


def test_unknown_cli_flags_listed(demo):
    with pytest.raises(UsageError) as err:
        parse_namespace(base_args(demo, "--lerning_rate", "1e-4", "--foo"))
    assert "unknown arguments: --lerning_rate --foo" in err.value.problems[0]


def test_no_prefix_abbreviations(demo):
    with pytest.raises(UsageError, match="unknown arguments: --learning_rat"):
        parse_namespace(base_args(demo, "--learning_rat", "1e-4"))


def test_unknown_yaml_keys_listed(demo, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lora_rank: 8\nuse_lora: true\nbatch: 3\n")
    with pytest.raises(UsageError, match=r"unknown keys batch, lora_rank"):
        parse_namespace(base_args(demo, "--config", str(recipe)))


def test_qwen_legacy_evaluation_strategy_alias(demo):
    config = prepare(base_args(demo, "--evaluation_strategy", "no", "--use_lora"))
    assert config.training.eval_strategy.value == "no"


def test_every_problem_reported_at_once(tmp_path):
    ns = parse_namespace([
        "--data_path", str(tmp_path / "missing.json"), "--lora_r", "0", "--lora_dropout", "1.5",
        "--truncation", "chop", "--quantization", "gptq", "--lazy_preprocess", "True",
    ])
    problems = validate_args(ns, machine=CPU)
    joined = "\n".join(problems)
    for expected in [
        "--model_name_or_path is required",
        "--data_path: file not found",
        "--lora_r 0",
        "--lora_dropout 1.5",
        "--truncation 'chop'",
        "--quantization gptq has no effect without --q_lora",
    ]:
        assert expected in joined
    assert len(problems) >= 6


def test_trust_remote_code_off_by_default(demo):
    assert prepare(base_args(demo, "--use_lora")).model.trust_remote_code is False


def test_q_lora_implies_lora_and_cpu_fallback(demo):
    config = prepare(base_args(demo, "--q_lora", "--fp16", "True"))
    assert config.lora.use_lora and config.quant_method == "nf4"
    assert config.training.use_cpu is True and config.training.fp16 is False
    assert config.training.ddp_find_unused_parameters is False
    assert any("training on CPU in float32" in n for n in config.notes)


def test_gradient_checkpointing_is_non_reentrant(demo):
    config = prepare(base_args(demo, "--use_lora", "--gradient_checkpointing"))
    assert config.training.activation_checkpointing is True
    assert config.training.activation_checkpointing_kwargs == {"use_reentrant": False}


def test_lora_only_flags_without_lora(demo):
    ns = parse_namespace(base_args(demo, "--lora_weight_path", "/nope"))
    problems = validate_args(ns, machine=CPU)
    assert any("--lora_weight_path: no adapter_config.json" in p for p in problems)
    assert any("--lora_weight_path has no effect without --use_lora" in p for p in problems)


def test_deepspeed_scheduler_block_is_warned_about(demo, tmp_path):
    import json

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
                              "scheduler": {"type": "WarmupLR", "params": {}}}))
    ns = parse_namespace(base_args(demo, "--use_lora", "--deepspeed", str(ds), "--lr_scheduler_type", "cosine"))
    assert validate_args(ns, machine=CPU) == []
    settings = resolve(ns, CPU)
    assert any("scheduler block (WarmupLR): it overrides --lr_scheduler_type" in w for w in settings.warnings)


def test_shipped_deepspeed_configs_have_no_scheduler_or_optimizer():
    import glob
    import json
    import os

    from tests.conftest import REPO

    paths = glob.glob(os.path.join(REPO, "ds_configs", "*.json"))
    assert len(paths) == 4
    for path in paths:
        config = json.load(open(path))
        assert "scheduler" not in config, path
        if "offload" not in path:
            assert "optimizer" not in config, path


def test_zero3_with_nf4_stores_4bit_weights_in_compute_dtype(demo):
    import os

    from tests.conftest import REPO

    config = prepare(base_args(demo, "--q_lora", "--deepspeed", os.path.join(REPO, "ds_configs", "zero3.json")))
    assert config.lora.bnb_4bit_quant_storage == "float32"  # CPU compute dtype
    assert any("ZeRO-3 with NF4" in n for n in config.notes)


def test_zero3_with_gptq_shards_the_packed_weights(demo, tmp_path):
    import os

    pytest.importorskip("gptqmodel")
    from qlaunch.model.gptq_pack import make_gptq_checkpoint
    from tests.conftest import REPO

    gptq = make_gptq_checkpoint(demo["model"], str(tmp_path / "gptq"))
    ns = parse_namespace(["--model_name_or_path", gptq, "--data_path", demo["train"], "--q_lora", "--deepspeed",
                          os.path.join(REPO, "ds_configs", "zero3.json")])
    assert validate_args(ns, machine=CPU) == []
    from qlaunch.config.resolve import resolve

    settings = resolve(ns, CPU, env={"WORLD_SIZE": "2"})  # not prepare(): its ZeRO-3 config would outlive the test
    # ZeRO-3 with 2 processes: rank 0 loads, zero.Init partitions (qlaunch.model.zero3_init); qlaunch scatters nothing
    assert settings.shard_gptq and settings.rank0_load and settings.zero3_init and not settings.rank0_scatter
    alone = resolve(ns, CPU, env={"WORLD_SIZE": "1"})  # one process: the engine places the model itself
    assert alone.shard_gptq and not alone.rank0_load and not alone.zero3_init
    assert any("ZeRO-3 with GPTQ: packed weights become frozen torch.float32 parameters" in n for n in settings.notes)
