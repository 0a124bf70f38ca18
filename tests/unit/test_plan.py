"""The memory plan: exact counts against real objects, precision as on the planned GPU, config-only
Qwen(1) directories without remote code, ZeRO partitioning, re-planned fit options, and --dry_run
printing the same plan as python -m qlaunch.plan."""
import json
import logging
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from qlaunch.cli import prepare
from qlaunch.config.errors import UsageError
from qlaunch.memory.estimate import gptq_bytes, nf4_bytes
from qlaunch.memory.fit import planned
from qlaunch.memory.planner import format_plan, memory_plan
from qlaunch.plan import prepare_plan
from tests.conftest import REPO
from tests.model_dims import DIMS, config_dir, shared_config

GiB = 1024**3
QWEN_LORA = ["--lora_r", "64", "--lora_target_modules", "c_attn", "c_proj", "w1", "w2"]


def plan_json(argv):
    ns, settings, target, stats, _ = prepare_plan(argv)
    return planned(ns, settings, target, stats)


def test_plan_counts_match_the_real_model(demo, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = prepare(["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir",
                      str(tmp_path), "--q_lora", "--lora_r", "8"])
    plan = memory_plan(config)
    model = AutoModelForCausalLM.from_pretrained(demo["model"])
    assert plan["parameters"] == sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                        "gate_proj", "up_proj", "down_proj"]))
    assert plan["trainable_parameters"] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert plan["base_weights_gib"] < plan["parameters"] * 4 / GiB  # 4-bit projections
    assert "Memory plan" in format_plan(plan)


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_bytes_equal_a_real_bitsandbytes_layer(double_quant):
    """Every byte a Linear4bit stores (codes + quant state, read from the object) equals the model's count."""
    import bitsandbytes as bnb

    from qlaunch.model.footprint import linear4bit_storage

    layer = bnb.nn.Linear4bit(384, 320, bias=False, quant_type="nf4", compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(torch.randn(320, 384), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant)
    layer = layer.to("cpu")  # quantizes
    storage = linear4bit_storage(layer)
    assert storage["weight_bytes"] + storage["state_bytes"] == nf4_bytes(384 * 320, double_quant)


def test_gptq_bytes_equal_a_packed_checkpoint():
    """int32 qweight/qzeros, fp16 scales and int32 g_idx of a hand-packed GPTQ v1 layer."""
    from qlaunch.model.gptq_pack import pack_gptq_v1, quantize_rtn_sym

    n_in, n_out, group = 512, 384, 128
    codes, scales, zero = quantize_rtn_sym(torch.randn(n_out, n_in), 4, group)
    packed = {**pack_gptq_v1(codes, zero, 4, group), "scales": scales}
    stored = sum(t.numel() * t.element_size() for t in packed.values())
    assert stored == gptq_bytes(n_in, n_out, False, {"bits": 4, "group_size": group}, training=False)


def _qwen7b_params():
    # written out term by term from Qwen-7B's architecture (not from qlaunch.memory.shape)
    h, ffn_half, vocab, layers = 4096, 11008, 151936, 32
    per_layer = (h * 3 * h + 3 * h) + h * h + 2 * h * ffn_half + ffn_half * h + 2 * h
    return layers * per_layer + h + 2 * vocab * h


def test_qwen1_config_only_directory_plans_without_remote_code(tmp_path):
    """Only config.json (the real one when ../shared has it): no weights, no tokenizer, no modelling code."""
    model = config_dir("Qwen/Qwen-7B", str(tmp_path))
    assert os.listdir(model) == ["config.json"]
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "qlaunch.plan", "--model_name_or_path", model, "--use_lora",
                           *QWEN_LORA, "--gpu", "A100-80GB", "--json"], capture_output=True, text=True, cwd=REPO)
    wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout)
    assert plan["parameters"] == _qwen7b_params() == 7_721_324_544
    assert plan["precision"]["compute_dtype"] == "bfloat16"  # A100: bf16 by the precision rules
    assert plan["memory_gb"]["per_device_peak"] > plan["parameters"] * 2 / GiB
    assert os.listdir(model) == ["config.json"]  # nothing downloaded or written
    print(f"python -m qlaunch.plan wall time (imports included, shared 2-core machine): {wall:.1f} s")


def test_planning_itself_is_fast(tmp_path):
    """The plan (after imports) for the largest recipe model: well under the 10 s budget."""
    model = config_dir("meta-llama/Meta-Llama-3-70B-Instruct", str(tmp_path), prefer_shared=False)
    argv = ["--model_name_or_path", model, "--q_lora", "--gpu", "H100-80GB"]
    plan_json(argv)  # imports
    start = time.monotonic()
    plan_json(argv)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("gpu, quant, dtype", [("A100-80GB", "nf4", "bfloat16"), ("T4", "nf4", "float16"),
                                               ("V100-32GB", None, "float16"), ("RTX-4090", "gptq", "float16")])
def test_precision_is_resolved_as_on_that_gpu(tmp_path, gpu, quant, dtype):
    model = config_dir("Qwen/Qwen-7B-Chat-Int4" if quant == "gptq" else "mistralai/Mistral-7B-Instruct-v0.3",
                       str(tmp_path))
    flags = ["--q_lora"] + (["--quantization", quant] if quant == "nf4" else []) if quant else ["--use_lora"]
    plan = plan_json(["--model_name_or_path", model, *flags, "--gpu", gpu])
    assert plan["precision"]["compute_dtype"] == dtype
    assert plan["quantization"] == quant


def test_bf16_on_a_gpu_without_it_is_refused_like_training(tmp_path):
    model = config_dir("mistralai/Mistral-7B-Instruct-v0.3", str(tmp_path))
    with pytest.raises(UsageError, match="--fp16 True"):
        plan_json(["--model_name_or_path", model, "--use_lora", "--bf16", "True", "--gpu", "T4"])


def test_custom_gpu_and_bad_gpu(tmp_path):
    model = config_dir("mistralai/Mistral-7B-Instruct-v0.3", str(tmp_path))
    plan = plan_json(["--model_name_or_path", model, "--q_lora", "--gpu_memory_gb", "16", "--gpu_capability", "7.5"])
    assert plan["device"]["memory_gb"] == 16 and plan["precision"]["compute_dtype"] == "float16"
    proc = subprocess.run([sys.executable, "-m", "qlaunch.plan", "--model_name_or_path", model, "--gpu", "GTX-9000"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "unknown GPU" in proc.stderr and "Traceback" not in proc.stderr


def test_lora_and_weight_terms_by_hand(tmp_path):
    """Mistral-7B NF4 (double quant): quantized weights, fp32 non-quantized parameters, fp32 LoRA r16
    + gradients + AdamW moments, counted here from the dimensions."""
    d = DIMS["mistralai/Mistral-7B-Instruct-v0.3"]
    h, inter, layers, heads, kv, vocab = (d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"],
                                          d["num_attention_heads"], d["num_key_value_heads"], d["vocab_size"])
    hd = h // heads
    shapes = [(h, h), (h, kv * hd), (h, kv * hd), (h, h), (h, inter), (h, inter), (inter, h)]
    quantized = layers * sum(nf4_bytes(i * o, True) for i, o in shapes)
    other = 2 * vocab * h + layers * 2 * h + h
    lora = layers * sum(16 * (i + o) for i, o in shapes)
    model = config_dir("mistralai/Mistral-7B-Instruct-v0.3", str(tmp_path))
    plan = plan_json(["--model_name_or_path", model, "--q_lora", "--quantization", "nf4", "--lora_r", "16",
                      "--optim", "adamw_torch", "--gpu", "A100-80GB"])
    persistent = plan["memory_gb"]["persistent"]
    assert math.isclose(persistent["base weights"] * GiB, quantized + 4 * other, rel_tol=1e-9)
    assert plan["trainable_parameters"] == lora
    assert math.isclose(persistent["optimizer state"] * GiB, 8 * lora, rel_tol=1e-9)
    assert math.isclose(persistent["gradients"] * GiB, 4 * lora, rel_tol=1e-9)


def test_zero_partitions_by_world_size(tmp_path):
    model = config_dir("Qwen/Qwen2-7B-Instruct", str(tmp_path))
    base = ["--model_name_or_path", model, "--use_lora", "--gpu", "A100-80GB"]
    zero2 = plan_json(base + ["--deepspeed", os.path.join(REPO, "ds_configs", "zero2.json"), "--num_gpus", "8"])
    zero3 = plan_json(base + ["--deepspeed", os.path.join(REPO, "ds_configs", "zero3.json"), "--num_gpus", "4",
                              "--num_nodes", "2"])
    assert zero3["world_size"] == 8
    p2, p3 = zero2["memory_gb"]["persistent"], zero3["memory_gb"]["persistent"]
    assert math.isclose(p3["base weights"] * 8, p2["base weights"], rel_tol=1e-9)  # ZeRO-3 shards the frozen base
    trainable = zero2["trainable_parameters"]
    assert math.isclose(p2["optimizer state (fp32 master + moments)"] * GiB, 12 * trainable / 8, rel_tol=1e-9)
    assert zero3["memory_gb"]["per_device_peak"] < zero2["memory_gb"]["per_device_peak"]


def test_longer_rows_eager_attention_and_no_checkpointing_cost_more(tmp_path):
    model = config_dir("meta-llama/Meta-Llama-3-8B-Instruct", str(tmp_path))
    base = ["--model_name_or_path", model, "--q_lora", "--gpu", "H100-80GB", "--activation_checkpointing", "True",
            "--per_device_train_batch_size", "1"]
    peak = lambda extra: plan_json(base + extra)["memory_gb"]["per_device_peak"]  # noqa: E731
    assert peak(["--model_max_length", "4096"]) > peak(["--model_max_length", "2048"])
    # checkpointed: eager's (heads, s, s) matrices exist for the one recomputed block only
    eager = plan_json(base + ["--model_max_length", "2048", "--attn_implementation", "eager"])["memory_gb"]
    sdpa = plan_json(base + ["--model_max_length", "2048"])["memory_gb"]
    heads, s = DIMS["meta-llama/Meta-Llama-3-8B-Instruct"]["num_attention_heads"], 2048
    assert math.isclose((eager["phases"]["block backward"] - sdpa["phases"]["block backward"]) * GiB,
                        (4 + 2) * heads * s * s + 2 * s * s, rel_tol=1e-9)  # fp32 softmax + its bf16 copy,
    # and eager's additive (1, 1, s, s) mask in bf16 (sdpa at batch 1 without packing uses is_causal)
    no_ckpt = ["--model_name_or_path", model, "--q_lora", "--gpu", "H100-80GB", "--model_max_length", "2048"]
    assert plan_json(no_ckpt)["memory_gb"]["per_device_peak"] > sdpa["per_device_peak"]
    assert (plan_json(no_ckpt + ["--attn_implementation", "eager"])["memory_gb"]["per_device_peak"]
            > plan_json(no_ckpt)["memory_gb"]["per_device_peak"])


def test_the_materialised_attention_mask_is_planned_where_transformers_builds_it(tmp_path):
    """sdpa builds a boolean (rows, 1, L, L) mask for packed rows or padded batches (1 GiB at 1 x 32k),
    none for one unpadded row; flash attention never builds one (issue 24 item 8)."""
    model = config_dir("meta-llama/Meta-Llama-3-8B-Instruct", str(tmp_path))
    base = ["--model_name_or_path", model, "--q_lora", "--gpu", "H100-80GB", "--model_max_length", "32768",
            "--per_device_train_batch_size", "1", "--activation_checkpointing", "True"]

    def phase(*extra):
        return plan_json(base + list(extra))["memory_gb"]["phases"]

    def mask_gib(*extra):
        from qlaunch.memory.estimate import Job, attention_mask_bytes
        return attention_mask_bytes(Job(**dict(extra))) / GiB

    assert mask_gib(("seq_len", 32768), ("packing", True)) == 1.0
    assert mask_gib(("seq_len", 32768), ("micro_batch", 2)) == 2.0  # padding: two rows
    assert mask_gib(("seq_len", 32768)) == 0.0  # one unpadded row: is_causal, no mask
    assert mask_gib(("seq_len", 32768), ("packing", True), ("attention", "flash_attention_2")) == 0.0
    packed, plain = phase("--packing", "True"), phase()
    assert math.isclose(packed["loss"] - plain["loss"], 1.0, rel_tol=1e-9)  # GiB
    assert math.isclose(packed["block backward"] - plain["block backward"], 1.0, rel_tol=1e-9)
    flash = phase("--packing", "True", "--attn_implementation", "flash_attention_2")
    assert flash["loss"] < packed["loss"]


def test_fit_verdict_options_are_replanned(tmp_path):
    """Every option the verdict offers is what re-planning with that flag gives, and it fits."""
    model = config_dir("meta-llama/Meta-Llama-3-8B-Instruct", str(tmp_path))
    argv = ["--config", os.path.join(REPO, "recipes", "llama3-8b-nf4-qlora.yaml"), "--model_name_or_path", model,
            "--gpu", "RTX-4090"]
    from qlaunch.memory.fit import options_that_fit

    ns, settings, target, stats, _ = prepare_plan(argv)
    plan = planned(ns, settings, target, stats, options_that_fit)
    assert plan["fit"]["fits"] is False and plan["fit"]["text"].startswith("does not fit:")
    assert plan["fit"]["options"]
    for option in plan["fit"]["options"]:
        flags = option["change"].split(" (")[0].split()
        again = plan_json(argv + flags)
        assert math.isclose(again["memory_gb"]["per_device_peak"], option["per_device_peak"], rel_tol=1e-9)
        assert again["fit"]["fits"] is True


def test_dry_run_prints_the_same_plan_as_the_plan_command(demo, tmp_path, caplog):
    from qlaunch.cli import fit

    flags = ["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir", str(tmp_path),
             "--q_lora", "--model_max_length", "64"]
    with caplog.at_level(logging.INFO, logger="qlaunch"):
        logging.getLogger("qlaunch").propagate = True
        fit(prepare(flags + ["--dry_run", "True"]))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    block = logged[logged.index("Memory plan:"):].split("\n--dry_run")[0]
    block = block[:block.index("peak per device")] + "peak per device"
    proc = subprocess.run([sys.executable, "-m", "qlaunch.plan", *flags], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert block in proc.stdout
    assert "data: " in block  # the real token lengths were used


def test_shared_configs_agree_with_the_dimension_table():
    found = 0
    for model_id, dims in DIMS.items():
        real = shared_config(model_id)
        if real is None:
            continue
        found += 1
        for key, value in dims.items():
            if key in real and key not in ("max_position_embeddings", "quantization_config"):
                assert real[key] == value, (model_id, key)
    if not found:
        pytest.skip("../shared/models/configs is absent")


def test_labelled_logits_plan_the_trained_share_of_positions(demo, tmp_path):
    """With --labelled_logits_only (the default) and data, lm_head sees the trained tokens only: the
    plan's logits chain shrinks by the data's trained share; without data or with the flag off,
    every position is planned."""
    from qlaunch.memory.planner import logits_fraction

    base = ["--model_name_or_path", demo["model"], "--q_lora", "--gpu", "A100-80GB", "--model_max_length", "128",
            "--data_path", demo["train"]]
    on, off = plan_json(base), plan_json(base + ["--labelled_logits_only", "False"])
    stats = on["tokens"]
    assert 0 < stats["trained_tokens"] < stats["tokens"]
    share = stats["trained_tokens"] / stats["tokens"]
    assert on["logit_positions"] == max(1, round(off["logit_positions"] * share))
    assert on["memory_gb"]["phases"]["loss"] < off["memory_gb"]["phases"]["loss"]
    no_data = [a for a in base if a not in ("--data_path", demo["train"])]
    assert off["logit_positions"] == off["tokens_per_micro_batch"]
    without = plan_json(no_data)
    assert without["logit_positions"] == without["tokens_per_micro_batch"]
    assert logits_fraction(type("A", (), {"labelled_logits_only": True})(), None) == 1.0


def test_fsdp2_shards_parameters_gradients_and_optimizer_state(tmp_path):
    model = config_dir("Qwen/Qwen2-7B-Instruct", str(tmp_path))
    base = ["--model_name_or_path", model, "--use_lora", "--gpu", "A100-80GB"]
    fsdp = os.path.join(REPO, "fsdp_configs", "fsdp2.json")
    ddp, two, four = (plan_json(base + extra) for extra in (
        ["--num_gpus", "2"], ["--fsdp_config", fsdp, "--num_gpus", "2"], ["--fsdp_config", fsdp, "--num_gpus", "4"]))
    assert two["job"]["engine"] == "fsdp2" and "FSDP2" in format_plan(two)
    pd, p2, p4 = (p["memory_gb"]["persistent"] for p in (ddp, two, four))
    for term in ("base weights", "trainable parameters", "gradients", "optimizer state"):
        assert math.isclose(p2[term] * 2, pd[term], rel_tol=1e-9), term
        assert math.isclose(p4[term] * 4, pd[term], rel_tol=1e-9), term
    assert "DDP gradient buckets" in pd and "DDP gradient buckets" not in p2
    assert two["memory_gb"]["phases"]["loss"] > 0 and "FSDP2 gathered blocks" in two["memory_gb"]["peak_transient"]
    offload = plan_json(base + ["--fsdp_config", os.path.join(REPO, "fsdp_configs", "fsdp2_offload.json"),
                                "--num_gpus", "2"])
    assert offload["memory_gb"]["persistent"]["base weights"] == 0  # shards in host memory
    assert offload["memory_gb"]["training_peak"] < two["memory_gb"]["training_peak"]
    # ZeRO-3's offload_param keeps the parameter partitions (base and 16-bit trainables) in host memory too
    zero3, zero3_offload = (plan_json(base + ["--deepspeed", os.path.join(REPO, "ds_configs", name), "--num_gpus", "2"])
                            for name in ("zero3.json", "zero3_offload.json"))
    z, zo = zero3["memory_gb"]["persistent"], zero3_offload["memory_gb"]["persistent"]
    assert z["base weights"] > 0 and z["trainable parameters (16-bit)"] > 0
    assert zo["base weights"] == 0 and zo["trainable parameters (16-bit)"] == 0
    assert zero3_offload["memory_gb"]["training_peak"] < zero3["memory_gb"]["training_peak"]
    # a full-precision base loads partitioned (ZeRO-3's zero.Init; FSDP2 via host memory): 1/N at load
    assert four["memory_gb"]["load_peak"] < two["memory_gb"]["load_peak"] < ddp["memory_gb"]["load_peak"]


def test_sharding_engines_load_a_4bit_base_as_shards(tmp_path):
    """Llama-3-70B NF4 on 8x RTX 4090. Under DDP bitsandbytes places the whole 4-bit base on every GPU (+ fp32
    embeddings/lm_head after k-bit preparation): it does not fit, and the verdict proposes the sharding
    engines. FSDP2 and ZeRO-3 build the 4-bit base in rank 0's host memory and move only shards to each GPU
    (qlaunch.model.rank0_load, qlaunch.model.zero3_init): their load phase is a fraction of the GPU. ZeRO-3
    in one process still places the whole base (the engine moves the module to the device)."""
    from qlaunch.memory.fit import options_that_fit

    model = config_dir("meta-llama/Meta-Llama-3-70B-Instruct", str(tmp_path))
    plans = {}
    zero3 = ["--deepspeed", os.path.join(REPO, "ds_configs", "zero3.json")]
    for name, engine, n in (("ddp", [], 8), ("zero3-1", zero3, 1), ("zero3", zero3, 8),
                            ("fsdp2", ["--fsdp_config", os.path.join(REPO, "fsdp_configs", "fsdp2.json")], 8)):
        argv = ["--config", os.path.join(REPO, "recipes", "llama3-70b-instruct-nf4-qlora.yaml"),
                "--model_name_or_path", model, "--gpu", "RTX-4090", "--num_gpus", str(n), *engine]
        ns, settings, target, stats, _ = prepare_plan(argv)
        plans[name] = planned(ns, settings, target, stats, options_that_fit)
    whole = plans["ddp"]["memory_gb"]["load"]["4-bit base, whole on every rank"]
    assert whole > 30  # ~35 GB of NF4 codes and state
    assert plans["ddp"]["fit"]["fits"] is False
    assert {o["change"] for o in plans["ddp"]["fit"]["options"][:2]} == {
        "--fsdp_config fsdp_configs/fsdp2.json", "--deepspeed ds_configs/zero3.json"}
    assert plans["zero3-1"]["memory_gb"]["load"]["4-bit base, whole on every rank"] == pytest.approx(whole)
    assert not plans["zero3-1"]["memory_gb"]["load_host"]
    for name in ("zero3", "fsdp2"):
        gb = plans[name]["memory_gb"]
        assert plans[name]["fit"]["fits"] is True and gb["peak_phase"] != "load", (name, gb)
        # on the GPU while loading: 1/8 of the base plus the one unit (FSDP2) / parameter (ZeRO-3) being moved
        assert gb["load"]["4-bit base shards (1/N)"] * 8 == pytest.approx(whole)
        assert gb["load_peak"] < whole / 3
        # ... and the whole 4-bit base (+ fp32 non-quantized weights) in rank 0's host memory only; the other
        # ranks hold the quantization state of the skeleton they are sent (1/64 of the weights + double quant)
        host = gb["load_host"]
        assert host["rank 0: 4-bit base, whole"] == pytest.approx(whole)
        assert 0.02 < host["each other rank: quantization state of the skeleton"] / host["rank 0: 4-bit base, whole"] < 0.04
        assert "host memory while loading, other ranks" in format_plan(plans[name])
    # ZeRO-3 moves one parameter at a time (the bf16 embedding: 128256 x 8192 x 2 bytes), FSDP2 one unit (fp32)
    assert plans["zero3"]["memory_gb"]["load"]["one parameter moved whole before sharding"] == pytest.approx(
        128256 * 8192 * 2 / 2**30)
    assert plans["zero3"]["memory_gb"]["load_peak"] < plans["fsdp2"]["memory_gb"]["load_peak"]


def test_a_load_limited_verdict_says_so_and_names_the_sharding_engines():
    from qlaunch.memory.fit import fit_verdict

    plan = {"device": {"memory_gb": 24.0, "name": "RTX-4090"}, "world_size": 8, "quantization": "nf4",
            "memory_gb": {"per_device_peak": 41.8, "peak_phase": "load", "load_peak": 41.8}}
    verdict = fit_verdict(plan, options=[])
    assert verdict["fits"] is False and "loading is the limit" in verdict["text"] and "41.8 GB" in verdict["text"]
    assert "--fsdp_config fsdp_configs/fsdp2.json or --deepspeed ds_configs/zero3.json" in verdict["text"]
    trained = fit_verdict({**plan, "memory_gb": {**plan["memory_gb"], "peak_phase": "loss"}}, options=[])
    assert "loading is the limit" not in trained["text"]


def test_engine_changes_are_fit_options_only_with_several_gpus():
    from types import SimpleNamespace

    from qlaunch.memory.fit import candidate_changes

    args = SimpleNamespace(per_device_train_batch_size=1, gradient_accumulation_steps=1, activation_checkpointing=True,
                           model_max_length=128, optim="paged_adamw_8bit", attn_implementation="sdpa", q_lora=True,
                           deepspeed=None, fsdp_config=None)
    texts = lambda *a: [t for t, _ in candidate_changes(args, *a) if t.startswith(("--deepspeed", "--fsdp"))]  # noqa
    assert texts(1, "nf4") == []
    assert texts(2, "nf4") == ["--deepspeed ds_configs/zero3.json", "--fsdp_config fsdp_configs/fsdp2.json",
                               "--fsdp_config fsdp_configs/fsdp2_offload.json"]
    assert texts(8, "gptq") == texts(2, "nf4")  # GPTQ shards too (qlaunch.model.gptq_shard)
    assert texts(1, "gptq") == []
    args.fsdp_config = {"version": 2}  # already FSDP2: not proposed again
    assert "--fsdp_config fsdp_configs/fsdp2.json" not in texts(2, "nf4")


def test_remote_code_models_plan_logits_at_every_position(tmp_path):
    """Qwen(1) runs its own modelling code, which the labelled-logits path cannot reach."""
    from types import SimpleNamespace

    from qlaunch.memory.planner import logits_fraction
    from qlaunch.memory.shape import model_shape

    args = SimpleNamespace(labelled_logits_only=True)
    stats = {"tokens": 1000, "trained_tokens": 250}
    with open(os.path.join(config_dir("Qwen/Qwen-7B", str(tmp_path)), "config.json")) as f:
        qwen1 = model_shape(json.load(f))
    assert qwen1.remote_loss
    assert logits_fraction(args, stats) == 0.25
    assert logits_fraction(args, stats, qwen1) == 1.0


def test_a_cpu_4bit_load_counts_the_mapped_checkpoint(demo):
    """On a CPU the device is the host: the full-precision checkpoint read to quantize stays mapped (its
    stored dtype from config.json); on a GPU it is host memory and not in the device's load phase."""
    cpu = plan_json(["--model_name_or_path", demo["model"], "--q_lora"])["memory_gb"]["load"]
    gpu = plan_json(["--model_name_or_path", demo["model"], "--q_lora", "--gpu", "A100-80GB"])["memory_gb"]["load"]
    with open(os.path.join(demo["model"], "config.json")) as f:
        stored = {"float32": 4, "bfloat16": 2, "float16": 2}[json.load(f).get("dtype") or "float32"]
    from transformers import AutoModelForCausalLM

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(demo["model"]).parameters())
    assert math.isclose(cpu["full-precision checkpoint, memory-mapped"] * GiB, params * stored, rel_tol=1e-9)
    assert "full-precision checkpoint, memory-mapped" not in gpu


def test_a_gptq_base_shards_under_zero3_and_fsdp2(tmp_path):
    """Qwen-72B-Chat-Int4 Q-LoRA at 2048 tokens (its recipe): one GPU needs ~61 GB (Qwen's A100-80GB cells are
    the N = 1 check, tests/unit/memory/test_plan_validation.py). Under ZeRO-3 and FSDP2 every rank holds 1/N
    of the packed weights (qlaunch.model.gptq_shard), and both build the base in rank 0's host memory and
    move only shards to the GPUs (qlaunch.model.zero3_init, qlaunch.model.rank0_load): both fit."""
    from qlaunch.memory.fit import options_that_fit

    model = config_dir("Qwen/Qwen-72B-Chat-Int4", str(tmp_path))
    recipe = ["--config", os.path.join(REPO, "recipes", "qwen-72b-chat-int4-qlora.yaml"), "--model_name_or_path", model]
    engines = {"ddp": [], "zero3": ["--deepspeed", os.path.join(REPO, "ds_configs", "zero3.json")],
               "fsdp2": ["--fsdp_config", os.path.join(REPO, "fsdp_configs", "fsdp2.json")]}
    plans = {}
    for gpu, n in (("A100-40GB", 4), ("RTX-4090", 8)):
        for name, engine in engines.items():
            ns, settings, target, stats, _ = prepare_plan([*recipe, "--gpu", gpu, "--num_gpus", str(n), *engine])
            plans[gpu, name] = planned(ns, settings, target, stats, options_that_fit)
            gb = plans[gpu, name]["memory_gb"]
            print(f"{gpu} x{n} {name}: load {gb['load_peak']:.1f} GB, training {gb['training_peak']:.1f} GB, "
                  f"fits {plans[gpu, name]['fit']['fits']}")
    for gpu, n in (("A100-40GB", 4), ("RTX-4090", 8)):
        ddp = plans[gpu, "ddp"]["memory_gb"]
        assert plans[gpu, "ddp"]["fit"]["fits"] is False and ddp["training_peak"] > 55  # the whole base per GPU
        for name in ("zero3", "fsdp2"):
            gb = plans[gpu, name]["memory_gb"]
            assert gb["persistent"]["base weights"] * n == pytest.approx(ddp["persistent"]["base weights"])
            assert gb["training_peak"] < 24
            assert plans[gpu, name]["fit"]["fits"] is True
            assert gb["load"]["4-bit base shards (1/N)"] * n == pytest.approx(
                plans[gpu, "ddp"]["memory_gb"]["load"]["GPTQ base, whole on every rank"], rel=0.15)
            assert set(gb["load_host"]) == {"rank 0: 4-bit base, whole", "rank 0: non-quantized weights, 16-bit"}
