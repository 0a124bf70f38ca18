"""Derived settings decided by device facts: tested on CPU by passing a GPU's facts in."""
import json
import os

import pytest
import torch

from qlaunch.config.arguments import parse_namespace
from qlaunch.config.machine import CPU, gpu
from qlaunch.config.engine import deepspeed_config_warnings
from qlaunch.config.resolve import resolve
from tests.conftest import REPO

A100, V100 = gpu((8, 0), "A100"), gpu((7, 0), "V100")
ZERO2 = os.path.join(REPO, "ds_configs", "zero2.json")


def ns(demo, *extra):
    return parse_namespace(["--model_name_or_path", demo["model"], "--data_path", demo["train"], *extra])


@pytest.mark.parametrize("extra", [["--use_lora", "--lora_modules_to_save", "embed_tokens", "lm_head"],
                                   ["--use_lora", "--lora_bias", "all"], ["--use_lora", "--lora_bias", "lora_only"],
                                   ["--use_lora"]])
def test_fp16_lora_keeps_trainables_fp32(demo, extra):
    settings = resolve(ns(demo, *extra), V100)  # auto → fp16 below capability 8.0
    assert settings.precision.fp16 and settings.fp32_trainables and settings.load_dtype is None
    assert settings.base_dtype == torch.float16  # the frozen base stays fp16 (half the memory)


def test_fp16_full_fine_tuning_loads_fp32_weights(demo):
    settings = resolve(ns(demo, "--fp16", "True"), A100)
    assert settings.load_dtype == torch.float32 and settings.base_dtype == torch.float32
    assert settings.compute_dtype == torch.float16 and any("fp16 full fine-tuning" in n for n in settings.notes)


def test_bf16_keeps_trainables_fp32_too(demo):
    """bf16 weights keep bf16 AdamW moments and drop updates below 1/256 of a weight: the weights the
    optimizer updates are float32 under bf16 as under fp16 (issue 24 item 1)."""
    assert resolve(ns(demo, "--use_lora"), A100).fp32_trainables  # auto → bf16 on Ampere
    full = resolve(ns(demo), A100)
    assert full.load_dtype == torch.float32 and full.compute_dtype == torch.bfloat16
    assert any("bf16 full fine-tuning: weights loaded in float32" in n for n in full.notes)


def test_no_fp32_upcast_where_it_is_not_needed(demo):
    assert not resolve(ns(demo, "--use_lora"), CPU).fp32_trainables  # CPU trains in float32
    assert resolve(ns(demo), CPU).load_dtype is None
    with_ds = resolve(ns(demo, "--fp16", "True", "--deepspeed", ZERO2), A100)  # DeepSpeed keeps fp32 masters
    assert with_ds.load_dtype is None and not with_ds.fp32_trainables
    bf16_ds = resolve(ns(demo, "--bf16", "True", "--deepspeed", ZERO2), A100)
    assert bf16_ds.load_dtype is None and not bf16_ds.fp32_trainables
    assert resolve(ns(demo, "--q_lora"), A100).load_dtype is None  # a 4-bit base is never upcast


def test_a_bf16_update_below_the_weight_resolution_survives_only_in_float32(demo):
    """AdamW at lr 1e-4 on weights at 1.0 (bf16 resolution there: 2**-7): 10 steps under bf16 autocast
    leave bf16 trainables exactly at 1.0 and move float32 ones by ~1e-3."""
    from transformers import AutoModelForCausalLM

    from qlaunch.model.lora import attach_lora, upcast_trainables

    def copy_after_training(upcast: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(demo["model"], dtype=torch.bfloat16)
        lora = parse_namespace(["--use_lora", "--lora_r", "4", "--lora_modules_to_save", "lm_head"])
        model = attach_lora(model, lora, quant_method=None, gradient_checkpointing=False)
        if upcast:
            assert upcast_trainables(model) > 0
        [copy] = [p for n, p in model.named_parameters() if "modules_to_save" in n and p.requires_grad]
        with torch.no_grad():
            copy.fill_(1.0)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                      weight_decay=0.0)
        ids = torch.arange(1, 17).unsqueeze(0)
        for _ in range(10):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return copy.detach().float()

    lost = copy_after_training(upcast=False)
    kept = copy_after_training(upcast=True)
    assert torch.equal(lost, torch.ones_like(lost))  # every update rounded away
    moved = (kept - 1).abs()
    assert (moved > 5e-4).float().mean() > 0.5 and moved.max() < 2e-3


def test_fp16_trainables_crash_the_grad_scaler_until_upcast(demo):
    """The GPU failure, reproduced with torch's real GradScaler: fp16 trainable parameters (LoRA with
    modules_to_save and biases on an fp16 base) cannot be unscaled; after upcast_trainables they can."""
    from transformers import AutoModelForCausalLM

    from qlaunch.model.lora import attach_lora, upcast_trainables

    def trainable_after_scaled_backward(upcast: bool):
        model = AutoModelForCausalLM.from_pretrained(demo["model"], dtype=torch.float16)
        lora = parse_namespace(["--use_lora", "--lora_r", "4", "--lora_bias", "all",
                                "--lora_modules_to_save", "embed_tokens", "lm_head"])
        model = attach_lora(model, lora, quant_method=None, gradient_checkpointing=False)
        if upcast:
            assert upcast_trainables(model) > 0
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale(sum(p.float().pow(2).sum() for p in params)).backward()
        scaler.unscale_(optimizer)
        return params

    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        trainable_after_scaled_backward(upcast=False)
    params = trainable_after_scaled_backward(upcast=True)
    assert all(p.dtype == torch.float32 for p in params)


def test_frozen_base_does_not_broadcast_buffers(demo):
    """GPTQ weights are buffers: DDP would broadcast the whole quantized model before every forward."""
    assert resolve(ns(demo, "--use_lora"), A100).training["ddp_broadcast_buffers"] is False
    assert resolve(ns(demo, "--q_lora"), CPU).training["ddp_broadcast_buffers"] is False
    assert "ddp_broadcast_buffers" not in resolve(ns(demo), A100).training  # full fine-tuning: DDP's default
    explicit = resolve(ns(demo, "--use_lora", "--ddp_broadcast_buffers", "True"), A100)
    assert "ddp_broadcast_buffers" not in explicit.training


def test_shipped_deepspeed_configs_raise_no_warning_of_our_own():
    for name in ("zero2.json", "zero3.json", "zero2_offload.json", "zero3_offload.json"):
        with open(os.path.join(REPO, "ds_configs", name)) as f:
            assert deepspeed_config_warnings(json.load(f)) == [], name


def test_optimizer_block_warnings_say_what_is_overridden():
    with open(os.path.join(REPO, "ds_configs", "zero2_offload.json")) as f:
        offload = json.load(f)
    [warning] = deepspeed_config_warnings(offload, "paged_adamw_8bit")
    assert "overrides --optim paged_adamw_8bit" in warning
    offload["optimizer"]["params"]["lr"] = 3e-5
    assert any("fixes lr" in w for w in deepspeed_config_warnings(offload))
    no_offload = {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
    assert any("remove the block" in w for w in deepspeed_config_warnings(no_offload))


def test_zero3_partitioned_parameters_are_counted_by_ds_numel():
    from qlaunch.model.lora import count_parameters

    model = torch.nn.Linear(4, 4)
    model.bias.requires_grad_(False)
    for p in model.parameters():  # what ZeRO-3 leaves on a rank: an empty tensor and the real size
        p.ds_numel = p.numel()
        p.data = torch.empty(0)
    assert count_parameters(model) == (16, 20)


def test_elastic_restart_resumes_like_a_requeue():
    from qlaunch.train.trainer import resume_request

    assert resume_request(None, {"TORCHELASTIC_RESTART_COUNT": "1"}) == "auto"
    assert resume_request(None, {"TORCHELASTIC_RESTART_COUNT": "0"}) is None
    assert resume_request(None, {}) is None
    # a requeued SLURM job (plain srun tasks have no launcher to add the flag) resumes too
    assert resume_request(None, {"SLURM_RESTART_COUNT": "1"}) == "auto"
    assert resume_request(None, {"SLURM_RESTART_COUNT": "0"}) is None
    assert resume_request(None, {"SLURM_RESTART_COUNT": "x"}) is None
    assert resume_request("ckpt/checkpoint-5", {"TORCHELASTIC_RESTART_COUNT": "2"}) == "ckpt/checkpoint-5"


def test_any_rank_is_the_local_flag_in_one_process():
    from qlaunch.train.callbacks import any_rank

    assert any_rank(True) is True and any_rank(False) is False


def test_one_process_on_a_multi_gpu_host_is_refused_with_the_launcher_command(demo):
    """transformers would run DataParallel over every visible GPU; decided from the machine's facts
    and the environment, so GPU hosts are tested here by passing their facts in."""
    eight, one = gpu((8, 0), "A100", count=8), gpu((8, 0), "A100", count=1)
    problems = resolve(ns(demo, "--q_lora"), eight, env={}).problems
    assert problems == [p for p in problems if p.startswith("8 GPUs are visible and no launcher")] and problems
    assert "launch/qlora_ds.sh" in problems[0] and "CUDA_VISIBLE_DEVICES=0" in problems[0]
    for launched in ({"WORLD_SIZE": "8", "RANK": "3", "LOCAL_RANK": "3"}, {"LOCAL_RANK": "0"}):
        assert not resolve(ns(demo, "--q_lora"), eight, env=launched).problems
    assert not resolve(ns(demo, "--q_lora"), one, env={}).problems  # CUDA_VISIBLE_DEVICES=0: one GPU seen
    assert not resolve(ns(demo, "--q_lora", "--deepspeed", ZERO2), eight, env={}).problems  # world of one
    assert not resolve(ns(demo, "--q_lora", "--dry_run", "True"), eight, env={}).problems
    assert not resolve(ns(demo, "--q_lora"), CPU, env={}).problems


FSDP2 = os.path.join(REPO, "fsdp_configs", "fsdp2.json")
TWO = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}


def write_json(tmp_path, name, payload):
    path = tmp_path / name
    path.write_text(json.dumps(payload))
    return str(path)


def test_fsdp_config_turns_fsdp2_on_and_shards_nf4_in_the_compute_dtype(demo):
    for machine, storage in ((A100, "bfloat16"), (V100, "float16"), (CPU, "float32")):
        settings = resolve(ns(demo, "--q_lora", "--fsdp_config", FSDP2), machine, env=TWO)
        assert not settings.problems, settings.problems
        assert settings.training["fsdp"] is True and settings.engine.name == "fsdp2"
        assert settings.engine.shards_parameters and settings.engine.label == "FSDP2"
        assert settings.lora["bnb_4bit_quant_storage"] == storage
        assert settings.rank0_load  # rank 0 reads the 4-bit base; the others receive their shards
    chosen = resolve(ns(demo, "--q_lora", "--fsdp_config", FSDP2, "--bnb_4bit_quant_storage", "float32"), A100, env=TWO)
    assert "bnb_4bit_quant_storage" not in chosen.lora and not chosen.problems
    offload = resolve(ns(demo, "--use_lora", "--fsdp_config", os.path.join(REPO, "fsdp_configs", "fsdp2_offload.json")),
                      A100, env=TWO)
    assert offload.engine.offload_params and offload.engine.label == "FSDP2 + CPU offload"
    assert not offload.rank0_load  # a full-precision base: accelerate's own loading
    planned = resolve(ns(demo, "--q_lora", "--fsdp_config", FSDP2, "--dry_run", "True"), A100, env={})
    assert not planned.rank0_load  # one process: nobody to send to
    zero3 = resolve(ns(demo, "--q_lora", "--deepspeed", os.path.join(REPO, "ds_configs", "zero3.json")), A100, env=TWO)
    # ZeRO-3 loads on rank 0 too, and deepspeed.zero.Init partitions (qlaunch.model.zero3_init): no scatter by qlaunch
    assert zero3.rank0_load and zero3.zero3_init and not zero3.rank0_scatter and zero3.training.get("fsdp") is None


@pytest.mark.parametrize("extra, config, problem", [
    (["--deepspeed", ZERO2], None, "--fsdp_config and --deepspeed: one engine"),
    ([], {"version": 1}, "version 1: qlaunch trains with FSDP2"),
    ([], {"version": 2, "state_dict_type": "SHARDED_STATE_DICT"}, "state_dict_type SHARDED_STATE_DICT"),
    ([], {"version": 2, "activation_checkpointing": True}, "activation_checkpointing true"),
    (["--bnb_4bit_quant_storage", "uint8"], None, "--bnb_4bit_quant_storage uint8 with FSDP2"),
])
def test_fsdp_refusals_name_the_problem_and_the_fix(demo, tmp_path, extra, config, problem):
    path = write_json(tmp_path, "fsdp.json", config) if config else FSDP2
    problems = resolve(ns(demo, "--q_lora", "--fsdp_config", path, *extra), A100, env=TWO).problems
    assert len(problems) == 1 and problem in problems[0], problems


def test_fsdp_needs_processes_and_shards_gptq(demo, tmp_path):
    one = resolve(ns(demo, "--q_lora", "--fsdp_config", FSDP2), A100, env={}).problems
    assert len(one) == 1 and "FSDP2 shards across processes, and this is one" in one[0]
    assert not resolve(ns(demo, "--q_lora", "--fsdp_config", FSDP2, "--dry_run", "True"), A100, env={}).problems
    bare = resolve(ns(demo, "--use_lora", "--fsdp", "full_shard"), A100, env=TWO).problems
    assert len(bare) == 1 and "pass --fsdp_config fsdp_configs/fsdp2.json" in bare[0]
    with open(os.path.join(demo["model"], "config.json")) as f:
        config = json.load(f)
    (tmp_path / "gptq").mkdir()  # what resolve reads of a GPTQ checkpoint: its config.json
    write_json(tmp_path / "gptq", "config.json", {**config, "quantization_config": {"quant_method": "gptq", "bits": 4}})
    gptq = parse_namespace(["--model_name_or_path", str(tmp_path / "gptq"), "--data_path", demo["train"], "--q_lora",
                            "--fsdp_config", FSDP2])
    settings = resolve(gptq, A100, env=TWO)
    assert not settings.problems, settings.problems
    # the packed weights become shardable parameters; rank 0 alone reads the checkpoint, and accelerate
    # broadcasts its tensors after fully_shard (fsdp2.json has cpu_ram_efficient_loading), not qlaunch
    assert settings.shard_gptq and settings.rank0_load and not settings.rank0_scatter
    assert any("FSDP2 with GPTQ: packed weights become frozen torch.float16 parameters" in n for n in settings.notes)
    ddp = resolve(parse_namespace(["--model_name_or_path", str(tmp_path / "gptq"), "--data_path", demo["train"],
                                   "--q_lora"]), A100, env=TWO)
    assert not ddp.shard_gptq and not ddp.rank0_load  # DDP replicates: the kernels keep their buffers
    # accelerate skips its own broadcast for Params4bit (NF4/FP4) and when cpu_ram_efficient_loading is off
    from qlaunch.config.resolve import scatter_needed

    assert [scatter_needed(q, True) for q in ("nf4", "fp4", "gptq")] == [True, True, False]
    assert scatter_needed("gptq", False)


def test_a_recipe_can_name_fsdp2(demo, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"q_lora: true\nfsdp_config: {FSDP2}\n")
    settings = resolve(parse_namespace(["--config", str(recipe), "--model_name_or_path", demo["model"],
                                        "--data_path", demo["train"]]), A100, env=TWO)
    assert settings.engine.name == "fsdp2" and settings.training["fsdp"] is True and not settings.problems
