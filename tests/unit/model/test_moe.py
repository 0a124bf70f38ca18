"""MoE bases: experts counted before loading, fused experts quantized to 4-bit under NF4/FP4 (qlaunch.model.experts_4bit),
LoRA on the fused experts through peft's target_parameters, the router's auxiliary loss in the trained loss."""
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


@pytest.mark.parametrize("quant, double_quant", [("nf4", True), ("fp4", False)])
def test_packed_experts_hold_what_bitsandbytes_computes(quant, double_quant):
    """Each expert's uint8 row gives back exactly bitsandbytes' own dequantization of that expert's matrix."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    from qlaunch.model.experts_4bit import ExpertLayout, PackedStack, packed_bytes, quantize_expert

    weights = torch.randn(3, 96, 80, generator=torch.Generator().manual_seed(1))  # 7680 values: not a multiple of 256 blocks
    layout = ExpertLayout(3, 96, 80, quant, double_quant, torch.float32)
    rows = torch.stack([quantize_expert(w, layout) for w in weights])
    assert rows.numel() == packed_bytes(3, 96, 80, double_quant) and PackedStack(rows, layout).shape == (3, 96, 80)
    for storage in (rows, rows.view(torch.bfloat16)):  # the same bytes stored as a float dtype (sharding engines)
        for e in range(3):
            own = dequantize_4bit(*quantize_4bit(weights[e], blocksize=64, compress_statistics=double_quant,
                                                quant_type=quant))
            assert torch.equal(PackedStack(storage, layout)[torch.tensor(e)], own)


@pytest.mark.parametrize("kind", list(KINDS))
def test_4bit_experts_and_their_lora_compute_what_peft_computes_on_the_dequantized_base(kind, moe):
    """NF4 experts: ~4.13 bits per parameter stored, logits near the 16-bit model's, and LoRA on them (peft's
    ParamWrapper, applied per expert) equal to peft's own on a 16-bit base holding the dequantized experts."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from qlaunch.model.experts_4bit import packed_parameters, packed_views, quantize_experts
    from qlaunch.model.lora import peft_over_packed_experts

    ids = torch.arange(5, 30).unsqueeze(0)
    plain = AutoModelForCausalLM.from_pretrained(moe[kind]).eval()
    model = AutoModelForCausalLM.from_pretrained(moe[kind]).eval()
    values, stored = quantize_experts(model, "nf4", True, torch.float32)
    assert values == sum(p.numel() for p in plain.parameters() if p.dim() == 3) and 4.1 < stored * 8 / values < 4.2
    assert model.config._experts_implementation == "eager"
    with torch.no_grad():
        exact, quantized = plain(input_ids=ids).logits, model(input_ids=ids).logits
    assert (exact - quantized).abs().mean() < 0.05 * exact.abs().mean()  # measured 0.7-1.8%

    names = {module: name for name, module in model.named_modules()}
    with packed_views(model):
        plain.load_state_dict({f"{names[m]}.{pname}": torch.stack([getattr(m, pname)[e] for e in range(4)])
                               for m, pname, _ in packed_parameters(model)}, strict=False)
    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"], target_parameters=EXPERTS[1:])
    adapted = peft_over_packed_experts(model, lambda: get_peft_model(model, LoraConfig(**lora)))
    reference = get_peft_model(plain, LoraConfig(**lora))
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    set_peft_model_state_dict(reference, get_peft_model_state_dict(adapted))
    with torch.no_grad():
        ours, peft_own = adapted(input_ids=ids).logits, reference(input_ids=ids).logits
        with adapted.disable_adapter():
            base = adapted(input_ids=ids).logits
    assert (ours - base).abs().max() > 1e-2  # the experts' LoRA acts
    assert torch.allclose(ours, peft_own, atol=1e-5), (ours - peft_own).abs().max()
    adapted(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in adapted.named_parameters() if p.requires_grad and ".experts." in n}
    assert len(grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("kind", list(KINDS))
def test_planned_moe_mlp_activations_are_what_autograd_keeps(kind, moe):
    """The plan's MoE MLP terms (top-k token copies, intermediates of the expert's width, outputs, router,
    shared expert) against the bytes autograd keeps in one sparse block's forward (fp32, CPU; the block's input
    and the parameters excluded, as the plan counts them elsewhere): within 10% (measured 1.6-2.3% low: topk's
    and the routing weights' small tensors). The dense formula used before (config intermediate_size, one pass
    per token) was 54-80% low on these blocks."""
    from transformers import AutoModelForCausalLM

    from qlaunch.memory.estimate import Job, block_activation_bytes
    from qlaunch.memory.experts import routed_experts_bytes
    from qlaunch.memory.shape import model_shape

    with open(f"{moe[kind]}/config.json") as f:
        shape = model_shape(json.load(f))
    model = AutoModelForCausalLM.from_pretrained(moe[kind])
    tokens = 64
    x = torch.randn(1, tokens, shape.hidden, requires_grad=True)
    ignored = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in ignored:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model.layers[0].mlp(x)
    planned, measured = sum(routed_experts_bytes(shape, 4, tokens).values()), sum(kept.values())
    assert abs(planned - measured) <= 0.1 * measured, (planned, measured)
    block = block_activation_bytes(shape, Job(compute_bytes=4), [], tokens, 1)  # the plan's terms for this block
    assert "mlp intermediates" not in block and sum(v for k, v in block.items() if "expert" in k or "router" in k) \
        == planned


def _expert_lora_model(path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qlaunch.model.experts_4bit import quantize_experts
    from qlaunch.model.lora import peft_over_packed_experts

    torch.manual_seed(0)  # the same adapter (peft draws A at random) each time
    model = AutoModelForCausalLM.from_pretrained(path)
    quantize_experts(model, "nf4", True, torch.float32)
    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"], target_parameters=EXPERTS[1:])
    adapted = peft_over_packed_experts(model, lambda: get_peft_model(model, LoraConfig(**lora)))
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    return adapted


@pytest.mark.parametrize("checkpointing", [False, True])
def test_backward_dequantizes_each_expert_again_instead_of_keeping_it(moe, monkeypatch, checkpointing):
    """F.linear saves its weight for backward, here a 16-bit expert matrix dequantized for one call: kept, every
    expert a token reached would stay in 16 bits until backward. The packed experts' forward leaves each to be
    dequantized again: what autograd keeps drops by exactly the matrices forward read, and the loss and every
    gradient are bit-identical to keeping them, with activation checkpointing (whose own saved-tensor hooks
    must still see everything else) and without."""
    import qlaunch.model.recompute_saved as recompute_saved

    ids = torch.arange(5, 40).unsqueeze(0)
    read = []
    remember = recompute_saved.RebuildInBackward.remember
    monkeypatch.setattr(recompute_saved.RebuildInBackward, "remember",
                        lambda self, matrix, build: (read.append(matrix.nbytes), remember(self, matrix, build)))

    def train_step(rebuild: bool):
        with monkeypatch.context() as patch:
            if not rebuild:  # as on a torch without the hooks getter: nothing installed, the matrices are kept
                patch.setattr(recompute_saved, "_outer_hooks", lambda: None)
            model = _expert_lora_model(moe["qwen3_moe"])
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
            model.train()
            kept = {}

            def pack(t):  # outermost hooks: see whatever is saved and not left to be rebuilt
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            read.clear()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
            return loss, sum(kept.values()), sum(read), grads

    loss, kept, read_bytes, grads = train_step(rebuild=True)
    kept_loss, kept_all, _, kept_grads = train_step(rebuild=False)
    assert torch.equal(loss, kept_loss) and grads.keys() == kept_grads.keys()
    assert all(torch.equal(grads[n], kept_grads[n]) for n in grads) and len(grads) == 12
    if not checkpointing:  # (checkpointing's own hooks sit inside the blocks, hiding them from the outermost)
        assert read_bytes > 0 and kept_all - kept == read_bytes, (kept_all, kept, read_bytes)


def test_moe_nf4_qlora_trains_4bit_experts_and_reloads(moe, demo, tmp_path):
    """The whole run: --q_lora on an MoE base quantizes its experts (no refusal), the plan counts them 4-bit and
    counts the expert LoRA peft builds, LoRA on them changes the experts' outputs, and the saved adapter loaded
    for inference (4-bit experts again, plain peft's adapter file) gives the trained model's logits."""
    from qlaunch.model.experts_4bit import packed_parameters
    from qlaunch.model.inference import load_for_inference

    out = tmp_path / "nf4"
    config = prepare(["--model_name_or_path", moe["qwen3_moe"], "--data_path", demo["train"], "--output_dir",
                      str(out), "--q_lora", *EXPERTS, *FAST])
    assert config.settings.quantize_experts and any("qlaunch quantizes them to nf4" in n for n in config.settings.notes)
    planned = memory_plan(config)
    outcome = fit(config)
    assert outcome.status == "done", outcome.message
    model = outcome.trainer.model.eval()
    packed = packed_parameters(model)
    values = sum(layout.experts * layout.values for _, _, layout in packed)
    stored = sum(module._parameters[name].numel() for module, name, _ in packed)  # uint8: bytes
    assert len(packed) == 4 and 4.1 < stored * 8 / values < 4.2
    linear_4bit = sum(p.numel() * 2 for p in model.parameters() if type(p).__name__ == "Params4bit")  # 2 per byte
    assert planned["quantized_parameters"] == values + linear_4bit
    assert planned["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    block = model.get_base_model().model.layers[0].mlp
    hidden = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = block(hidden)
        with model.disable_adapter():
            plain = block(hidden)
    adapted, plain = (x[0] if isinstance(x, tuple) else x for x in (adapted, plain))
    assert (adapted - plain).abs().max() > 1e-4  # the block has no attention: only the experts' LoRA acts
    ids = torch.arange(5, 25).unsqueeze(0)
    reloaded, _ = load_for_inference(adapter=str(out), device="cpu", dtype=torch.float32)
    assert len(packed_parameters(reloaded)) == 4
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_4bit_experts_under_a_sharding_engine_are_stored_as_the_compute_dtype(moe, demo, tmp_path):
    """ZeRO-3 and FSDP2 shard the packed stacks like bitsandbytes' Linear4bit weights: as the compute dtype
    (the same bytes), so DeepSpeed's cast leaves them alone and FSDP2 shards them (2-process runs:
    tests/integration/test_moe_engines.py)."""
    from tests.conftest import REPO

    config = prepare(["--model_name_or_path", moe["mixtral"], "--data_path", demo["train"], "--output_dir",
                      str(tmp_path / "x"), "--q_lora", "--deepspeed", f"{REPO}/ds_configs/zero3.json", *FAST])
    assert config.settings.quantize_experts and config.lora.bnb_4bit_quant_storage == "float32"


def test_4bit_experts_load_in_host_memory_on_a_gpu():
    """GPU facts: an MoE whose experts qlaunch quantizes is built in host memory (bitsandbytes leaves them
    16-bit), each stack packed on this rank's GPU; under DDP / ZeRO-2 the packed rows stay there and the model
    follows, under ZeRO-3 / FSDP2 they go back to host memory, which the sharded load takes the model from;
    other 4-bit bases load straight onto the GPU."""
    from qlaunch.config.engine import Engine
    from qlaunch.model.load import device_map_for, experts_placement, training_device

    assert device_map_for("nf4", cuda=True, engine=Engine(), local_rank=1, experts_4bit=True) == {"": "cpu"}
    assert device_map_for("nf4", cuda=True, engine=Engine(), local_rank=1) == {"": 1}
    assert training_device(True, 1) == torch.device("cuda:1") and training_device(False) == torch.device("cpu")
    gpu1, cpu = torch.device("cuda:1"), torch.device("cpu")
    for replicating in (Engine(), Engine("deepspeed", zero_stage=2)):
        placed = experts_placement(True, replicating, local_rank=1)
        assert (placed.quantize_on, placed.keep_on, placed.move_model) == (gpu1, gpu1, True)
    for sharding in (Engine("deepspeed", zero_stage=3), Engine("fsdp2"), Engine("fsdp2", offload_params=True)):
        placed = experts_placement(True, sharding, local_rank=1)
        assert (placed.quantize_on, placed.keep_on, placed.move_model) == (gpu1, cpu, False)
    for engine in (Engine(), Engine("fsdp2")):
        placed = experts_placement(False, engine, local_rank=1)
        assert (placed.quantize_on, placed.keep_on, placed.move_model) == (cpu, cpu, False)


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


@pytest.mark.parametrize("lora", ["--use_lora", "--q_lora"])
def test_the_routers_auxiliary_loss_is_in_the_trained_loss(moe, demo, tmp_path, lora):
    """With output_router_logits (as the model's config defines it) the loss qlaunch's Trainer optimizes is
    cross-entropy + router_aux_loss_coef x the load-balancing loss, not cross-entropy alone (16-bit and 4-bit
    experts)."""
    import torch.nn.functional as F

    from qlaunch.cli import load_datasets, load_model
    from qlaunch.model.load import load_tokenizer
    from qlaunch.train.trainer import build_trainer

    config = prepare(["--model_name_or_path", moe["mixtral"], "--data_path", demo["train"], "--output_dir",
                      str(tmp_path / "aux"), lora, *FAST])
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


def test_plan_of_qwen3_30b_a3b_nf4_counts_4bit_experts_and_their_16_bit_load(tmp_path, capsys):
    """--q_lora on the published Qwen3-30B-A3B: the experts count as packed 4-bit (≈4.13 bits), the base is ~1/3.6
    of its 16-bit size on one GPU, and the host holds the 16-bit experts while they load (GPU facts); under
    FSDP2 on 8 GPUs each holds 1/8 of the 4-bit base."""
    from qlaunch.plan import main as plan_main
    from tests.model_dims import config_dir

    path = config_dir("Qwen/Qwen3-30B-A3B", str(tmp_path), prefer_shared=False)
    args = ["--model_name_or_path", path, "--gpu", "H100-80GB", "--num_gpus", "1", "--gradient_checkpointing", "True",
            "--model_max_length", "2048", "--per_device_train_batch_size", "1", "--json"]
    reports = {}
    for lora in ("--use_lora", "--q_lora"):
        plan_main([*args, lora])
        reports[lora] = json.loads(capsys.readouterr().out)
    nf4, full = reports["--q_lora"], reports["--use_lora"]
    experts = 48 * 128 * 3 * 2048 * 768
    assert nf4["experts"]["fused_expert_parameters"] == experts and nf4["quantized_parameters"] > experts
    host = nf4["memory_gb"]["load_host"]
    assert host["each rank: fused experts, 16-bit until quantized"] * 1024**3 == pytest.approx(experts * 2)
    ratio = full["memory_gb"]["persistent"]["base weights"] / nf4["memory_gb"]["persistent"]["base weights"]
    assert 3.2 < ratio < 3.9, ratio  # 16-bit experts vs 4.13 bits (plus the fp32 embeddings kept by both)
    assert nf4["memory_gb"]["per_device_peak"] < 24  # attention LoRA, 2048 tokens: a 24 GB GPU's job
    assert nf4["memory_gb"]["load"]["one expert stack being quantized (16-bit)"] * 1024**3 == 128 * 2 * 768 * 2048 * 2
    # FSDP2 on 8 GPUs: rank 0 builds the base in host memory (the experts 16-bit until packed), each GPU holds 1/8
    from tests.conftest import REPO

    plan_main([*args, "--q_lora", "--fsdp_config", f"{REPO}/fsdp_configs/fsdp2.json", "--num_gpus", "8"])
    sharded = json.loads(capsys.readouterr().out)["memory_gb"]
    assert sharded["load_host"]["rank 0: fused experts, 16-bit until quantized"] * 1024**3 == pytest.approx(experts * 2)
    assert sharded["persistent"]["base weights"] == pytest.approx(nf4["memory_gb"]["persistent"]["base weights"] / 8)
