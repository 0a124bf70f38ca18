"""Derived settings: everything qlaunch decides from the flags, the checkpoint and the machine.

Computed once, before the Hugging Face TrainingArguments object is built (its constructor rejects
e.g. --bf16 on a CPU), into one `Settings` object; `overrides()` is what it changes in the
arguments. Contradictions found while deriving are collected as problems, like the checks in
validate.py; nothing here mutates the parsed arguments.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from qlaunch.config.domains import FINETUNE
from qlaunch.config.environment import LAUNCHER_VARIABLES, signal_lead
from qlaunch.config.engine import (
    Engine,
    deepspeed_config_warnings,
    engine_of,
    read_json_config,
    zero_stage,
)
from qlaunch.config.errors import UsageError
from qlaunch.config.machine import Machine
from qlaunch.config.precision import Precision, resolve_precision

@dataclass
class Settings:
    """What this run resolved to. `training` / `lora` / `model` hold argument overrides."""

    quant_method: str | None = None
    precision: Precision | None = None
    load_dtype: torch.dtype | None = None  # the base's dtype at load (None: the compute dtype)
    fp32_trainables: bool = False  # upcast 16-bit trainable parameters after LoRA is attached
    engine: Engine = field(default_factory=Engine)  # DDP, DeepSpeed ZeRO-n or FSDP2: what is sharded
    rank0_load: bool = False  # ZeRO-3/FSDP2 + 4-bit: rank 0 reads the base, the others get shards (model/rank0_load)
    rank0_scatter: bool = True  # FSDP2: ...and qlaunch scatters its tensors (accelerate does it for GPTQ, rank0_load)
    zero3_init: bool = False  # ZeRO-3 + 4-bit: partitioned before the engine places it (model/zero3_init)
    shard_gptq: bool = False  # ZeRO-3 / FSDP2 + GPTQ: packed weights as shardable parameters (model/gptq_shard)
    signal_lead: float | None = None  # seconds from SLURM's warning to the kill (QLAUNCH_SIGNAL_LEAD)
    experts: Any = None  # an MoE base's experts (qlaunch.config.moe.Experts), counted before loading
    target_parameter_shapes: tuple = ()  # shapes of the parameters --lora_target_parameters adapts (for the plan)
    quantize_experts: bool = False  # NF4/FP4 on fused 3-D experts: qlaunch quantizes them (model/experts_4bit)
    model: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.precision.compute_dtype if self.precision else torch.float32

    @property
    def base_dtype(self) -> torch.dtype:
        return self.load_dtype or self.compute_dtype

    def overrides(self) -> dict[str, Any]:
        return {**self.model, **self.lora, **self.training}


def world_size(env=os.environ) -> int:
    return int(env.get("WORLD_SIZE", "1"))


def model_path(ns: argparse.Namespace) -> str | None:
    """A local model directory as an absolute path: the adapter records it as its base."""
    path = ns.model_name_or_path
    if path and os.path.isdir(os.path.expanduser(path)):
        return os.path.abspath(os.path.expanduser(path))
    return path


def resolve_quantization(ns: argparse.Namespace, path: str | None, settings: Settings) -> None:
    from qlaunch.config.checkpoint import checkpoint_quant_method, require_library, resolve_quant_method
    from qlaunch.config.choices import CHOICES

    use_lora = bool(ns.use_lora or ns.q_lora)
    if path and (ns.q_lora or os.path.isdir(path)):
        try:
            checkpoint = checkpoint_quant_method(path, ns.trust_remote_code)
            if ns.quantization in CHOICES["quantization"]:
                settings.quant_method = resolve_quant_method(ns.q_lora, ns.quantization, checkpoint)
        except UsageError as e:
            settings.problems.extend(e.problems)
        except (OSError, ValueError) as e:
            settings.problems.append(f"--model_name_or_path {path!r}: cannot read its config: {e}")
    missing = require_library(settings.quant_method)
    if missing:
        settings.problems.append(missing)
    if path and os.path.isdir(path) and not settings.problems:
        resolve_experts(ns, path, settings)
    if settings.quant_method == "gptq" and ns.lora_modules_to_save and use_lora:
        from qlaunch.config.checkpoint import GPTQ_EMBEDDINGS

        settings.problems.append(GPTQ_EMBEDDINGS.format(modules=" ".join(ns.lora_modules_to_save)))
    if settings.quant_method == "gptq" and getattr(ns, "use_dora", False) and use_lora:
        settings.problems.append("--use_dora with a GPTQ base: peft has no DoRA layer for GPTQ kernels (its "
                                 "QuantLinear refuses it); use plain LoRA (optionally --use_rslora) or an NF4 base.")


def loftq_problems(quant_method: str | None, dora: bool, continuing: bool, sharded: bool) -> list[str]:
    """--init_lora_weights loftq: the adapter starts at the 4-bit error of a bitsandbytes base (qlaunch.model.loftq).
    sharded: the engine shards parameters (ZeRO-3, FSDP2)."""
    problems = []
    if quant_method not in ("nf4", "fp4"):
        problems.append(f"--init_lora_weights loftq initialises the adapter from the 4-bit quantization error of an "
                        f"NF4/FP4 base; this run's base is {quant_method or 'not quantized'}: add --q_lora True (NF4), "
                        "or use true.")
    elif dora:
        problems.append("--init_lora_weights loftq with --use_dora: DoRA's magnitudes are computed from the base when "
                        "the adapter is created, before LoftQ sets B; use one of them.")
    elif continuing:
        problems.append("--init_lora_weights loftq with --lora_weight_path: the adapter is loaded, not initialised; "
                        "remove one.")
    if sharded:
        problems.append("--init_lora_weights loftq with ZeRO-3 or FSDP2: not supported yet (ranks other than 0 hold "
                        "no 4-bit weights when the adapter is created); use DDP or ZeRO-2, or true.")
    return problems


def resolve_experts(ns: argparse.Namespace, path: str, settings: Settings) -> None:
    """An MoE base's experts (qlaunch.config.moe), counted on its meta skeleton when its config is an MoE or
    --lora_target_parameters names parameters to check. Under NF4/FP4, fused 3-D experts (which bitsandbytes
    leaves in 16 bits) are quantized by qlaunch.model.experts_4bit."""
    from qlaunch.config.checkpoint import read_config
    from qlaunch.config.moe import (
        count_experts,
        experts_4bit_note,
        is_moe,
        meta_skeleton,
        targeted_parameter_shapes,
        unknown_target_parameters,
    )

    config = read_config(path)
    wanted = getattr(ns, "lora_target_parameters", None)
    if not (is_moe(config) or wanted):
        return
    try:
        skeleton = meta_skeleton(path, trust_remote_code=ns.trust_remote_code)
    except Exception as e:  # a config transformers cannot build: the load reports it with its own words
        settings.notes.append(f"could not build {path!r} on the meta device to count its experts ({e})")
        return
    unknown = unknown_target_parameters(wanted, skeleton)
    if unknown:
        settings.problems.append(f"--lora_target_parameters {' '.join(unknown)}: no parameter of that name in "
                                 f"{path!r}; name a parameter, e.g. mlp.experts.gate_up_proj.")
    settings.target_parameter_shapes = targeted_parameter_shapes(wanted, skeleton)
    if is_moe(config):
        settings.experts = count_experts(config, skeleton)
        settings.notes.append(settings.experts.text())
        if settings.quant_method in ("nf4", "fp4") and settings.experts.fused_tensors:
            settings.quantize_experts = True
            settings.notes.append(experts_4bit_note(settings.experts, settings.quant_method))


def shard_4bit_storage(ns: argparse.Namespace, settings: Settings, engine: str) -> None:
    """ZeRO-3 and FSDP2 shard parameters; packed 4-bit weights shard with the rest only when stored in a
    floating dtype. bitsandbytes' (transformers/peft's recipe): the compute dtype, unless chosen. GPTQ's:
    always the compute dtype, the same bytes (qlaunch.model.gptq_shard).
    An integer storage is refused: FSDP2 leaves it out of sharding (accelerate puts such Params4bit in
    ignored_params: every rank keeps the whole 4-bit base), and DeepSpeed casts parameters to the
    compute dtype at init, which would turn packed codes into different numbers."""
    if settings.quant_method == "gptq":
        settings.shard_gptq = True
        settings.notes.append(f"{engine} with GPTQ: packed weights become frozen {settings.compute_dtype} parameters "
                              f"holding the same bytes, so {engine} shards them; the kernels read them back as "
                              "int32 inside forward.")
        return
    if settings.quant_method not in ("nf4", "fp4"):
        return
    if ns.bnb_4bit_quant_storage in ("uint8", "int8"):
        settings.problems.append(f"--bnb_4bit_quant_storage {ns.bnb_4bit_quant_storage} with {engine}: packed 4-bit "
                                 "weights in an integer dtype cannot be sharded (FSDP2 keeps them whole on every "
                                 "rank, DeepSpeed casts them to the compute dtype); remove the flag (qlaunch stores "
                                 "them in the compute dtype) or pass bfloat16/float16/float32.")
        return
    if not ns.bnb_4bit_quant_storage:
        storage = str(settings.compute_dtype).replace("torch.", "")
        settings.lora["bnb_4bit_quant_storage"] = storage
        settings.notes.append(f"{engine} with {settings.quant_method.upper()}: 4-bit weights stored as "
                              f"{storage} (--bnb_4bit_quant_storage) so {engine} can shard them.")


def resolve_deepspeed(ns: argparse.Namespace, settings: Settings, env=os.environ) -> None:
    ds_config = read_json_config(ns.deepspeed)
    settings.warnings += deepspeed_config_warnings(ds_config, str(getattr(ns.optim, "value", ns.optim)))
    if getattr(ns, "loraplus_lr_ratio", None) and ds_config.get("optimizer"):
        settings.problems.append("--loraplus_lr_ratio with a DeepSpeed config that has an optimizer block: DeepSpeed "
                                 "builds that optimizer itself, without LoRA+'s learning-rate groups; use a config "
                                 "without the block (ds_configs/zero2.json, zero3.json).")
    if zero_stage(ds_config) != 3:
        return
    shard_4bit_storage(ns, settings, "ZeRO-3")
    if settings.quant_method in ("nf4", "fp4", "gptq") and world_size(env) > 1:
        settings.rank0_load, settings.rank0_scatter, settings.zero3_init = True, False, True
        settings.notes.append("ZeRO-3 with a 4-bit base: rank 0 loads it in host memory, the other ranks read "
                              "nothing; deepspeed.zero.Init partitions it one parameter at a time, so no device "
                              "holds the whole base.")


def scatter_needed(quant_method: str | None, cpu_ram_efficient_loading: bool) -> bool:
    """Whether qlaunch must scatter rank 0's tensors after fully_shard (qlaunch.model.rank0_load): accelerate
    broadcasts them itself when cpu_ram_efficient_loading is on, except for models with bitsandbytes'
    Params4bit (NF4/FP4), which it skips."""
    return quant_method in ("nf4", "fp4") or not cpu_ram_efficient_loading


def resolve_fsdp(ns: argparse.Namespace, settings: Settings, env=os.environ) -> None:
    """--fsdp_config CONFIG turns FSDP2 on by itself (fully_shard through the Trainer's accelerate
    integration); qlaunch sets what else the Trainer needs."""
    if not ns.fsdp_config:
        if ns.fsdp:
            settings.problems.append(f"--fsdp {ns.fsdp}: qlaunch turns FSDP2 on from its config; pass "
                                     "--fsdp_config fsdp_configs/fsdp2.json instead.")
        return
    if ns.deepspeed:
        settings.problems.append("--fsdp_config and --deepspeed: one engine shards the model; pass one of them.")
        return
    config = read_json_config(ns.fsdp_config)
    version = str(config.get("version", config.get("fsdp_version", 2)))
    if version != "2":
        settings.problems.append(f"--fsdp_config: version {version}: qlaunch trains with FSDP2 (torch's fully_shard); "
                                 "set \"version\": 2 (see fsdp_configs/fsdp2.json).")
    if str(config.get("activation_checkpointing", False)).lower() == "true":
        settings.problems.append("--fsdp_config: activation_checkpointing true: FSDP's checkpoint wrapper renames the "
                                 "modules peft looks the adapter up by, and the saved adapter would be empty; set it "
                                 "false and use --gradient_checkpointing (the Trainer's, qlaunch's default).")
    state_dict = str(config.get("state_dict_type", config.get("fsdp_state_dict_type", "FULL_STATE_DICT")))
    if state_dict != "FULL_STATE_DICT":
        settings.problems.append(f"--fsdp_config: state_dict_type {state_dict}: qlaunch saves the adapter gathered "
                                 "(FULL_STATE_DICT; the Trainer writes no weights otherwise). The adapter and its "
                                 "optimizer state are small; set \"state_dict_type\": \"FULL_STATE_DICT\".")
    shard_4bit_storage(ns, settings, "FSDP2")
    if settings.quant_method in ("nf4", "fp4", "gptq") and world_size(env) > 1:
        settings.rank0_load = True
        settings.rank0_scatter = scatter_needed(
            settings.quant_method, str(config.get("cpu_ram_efficient_loading", False)).lower() == "true")
        settings.notes.append("FSDP2 with a 4-bit base: rank 0 loads it in host memory; the other ranks read nothing "
                              "and receive their shards once fully_shard has run.")
    if world_size(env) < 2 and not ns.dry_run:
        settings.problems.append("--fsdp_config: FSDP2 shards across processes, and this is one: start 2 or more "
                                 "with a launcher (bash launch/qlora_ds.sh --fsdp fsdp_configs/fsdp2.json ...).")
    settings.training["fsdp"] = True




def launcherless_multi_gpu(machine: Machine, env, *, deepspeed: bool, dry_run: bool) -> str | None:
    """One process on a host with several visible GPUs: transformers then sets n_gpu to the GPU count
    and runs nn.DataParallel (GPU 0 takes a 4-bit base's whole batch; the labelled-logits loss's 1-D
    shift_labels split into chunks that match no replica). One-process DeepSpeed gets a world of one
    from finetune.py and uses one GPU, so it is not refused; a dry run trains nothing."""
    if not machine.cuda or machine.device_count < 2 or deepspeed or dry_run:
        return None
    if any(name in env for name in LAUNCHER_VARIABLES):
        return None
    return (f"{machine.device_count} GPUs are visible and no launcher started this process: one process would "
            "drive them all (DataParallel). Start one process per GPU with bash launch/qlora_ds.sh (or "
            "launch/lora_ds.sh, torchrun), or use one GPU: CUDA_VISIBLE_DEVICES=0 python finetune.py ...")


def resolve_distributed(ns: argparse.Namespace, settings: Settings, machine: Machine, env=os.environ) -> None:
    training, use_lora = settings.training, settings.lora.get("use_lora", ns.use_lora)
    problem = launcherless_multi_gpu(machine, env, deepspeed=bool(ns.deepspeed), dry_run=bool(ns.dry_run))
    if problem:
        settings.problems.append(problem)
    if not machine.cuda:
        training["use_cpu"] = True  # without it, torchrun workers train independent world-size-1 copies
        if world_size(env) > 1 and not ns.ddp_backend:
            training["ddp_backend"] = "gloo"
    if use_lora and ns.ddp_find_unused_parameters is None:
        training["ddp_find_unused_parameters"] = False  # frozen base: DDP must not wait for grads that never come
    if use_lora and ns.ddp_broadcast_buffers is None:
        # DDP re-broadcasts every buffer from rank 0 before each forward; GPTQ's packed weights are
        # buffers, so that is the whole quantized model every step. A frozen base's buffers
        # (packed weights, rotary tables) are identical on every rank by construction.
        training["ddp_broadcast_buffers"] = False


def resolve_fp32_trainables(ns: argparse.Namespace, settings: Settings) -> None:
    """Mixed precision keeps the weights it updates in float32; autocast computes in 16 bits. fp16
    parameters cannot be updated at all (GradScaler: "Attempting to unscale FP16 gradients"), and bf16
    parameters keep AdamW's moments in bf16 too (torch stores optimizer state in the parameter's dtype)
    and drop every update smaller than 1/256 of the weight. Without DeepSpeed (whose optimizers keep
    fp32 master weights themselves): full fine-tuning loads the base in float32, and LoRA runs keep every
    trainable parameter in float32 — adapters (peft does that), and also --lora_modules_to_save copies
    and --lora_bias all|lora_only biases, which peft leaves in the base's dtype."""
    precision = settings.precision
    if not (precision and (precision.fp16 or precision.bf16)) or ns.deepspeed:
        return
    if settings.lora.get("use_lora", ns.use_lora):
        settings.fp32_trainables = True
    elif settings.quant_method is None:
        settings.load_dtype = torch.float32
        half = "fp16" if precision.fp16 else "bf16"
        why = ("GradScaler cannot update fp16 weights" if precision.fp16 else
               "bf16 weights and AdamW states would drop updates smaller than 1/256 of a weight")
        settings.notes.append(f"{half} full fine-tuning: weights loaded in float32 ({half} autocast computes; {why}).")


def resolve_packing(ns: argparse.Namespace, path: str | None, settings: Settings) -> None:
    """Packing isolates samples through transformers' attention (position ids restart per sample).
    A checkpoint's own modelling code (auto_map, run with --trust_remote_code, e.g. Qwen-7B's
    modeling_qwen.py) does not go through it and would let packed samples attend to each other."""
    from qlaunch.config.checkpoint import read_config

    if not (ns.packing and ns.trust_remote_code and path and os.path.isfile(os.path.join(path, "config.json"))):
        return
    try:
        config = read_config(path)  # as JSON: the remote code itself never runs here
    except UsageError:
        return  # resolve_quantization reports an unreadable config
    remote = (config.get("auto_map") or {}).get("AutoModelForCausalLM")
    if remote:
        settings.problems.append(f"--packing with a model that runs its own modelling code ({remote}, "
                                 "--trust_remote_code): its attention does not isolate packed samples; remove "
                                 "--packing (dynamic padding) or use --group_by_length.")


def resolve(ns: argparse.Namespace, machine: Machine, env=None) -> Settings:
    """Every setting qlaunch derives, with the problems found on the way. Does not change `ns`.
    env: the environment (os.environ as it is at the call, not at import)."""
    env = os.environ if env is None else env
    settings = Settings()
    if ns.q_lora and not ns.use_lora:
        settings.lora["use_lora"] = True  # Q-LoRA is LoRA on a quantized base
    path = model_path(ns)
    if path != ns.model_name_or_path:
        settings.model["model_name_or_path"] = path
    resolve_quantization(ns, path, settings)
    resolve_packing(ns, path, settings)

    precision = resolve_precision(settings.quant_method, bool(ns.fp16), bool(ns.bf16), machine=machine,
                                  precision=ns.precision, tf32=ns.tf32)
    settings.precision = precision
    settings.problems += precision.problems
    settings.notes += precision.notes
    settings.warnings += precision.warnings
    settings.training.update(fp16=precision.fp16, bf16=precision.bf16, tf32=precision.tf32)

    settings.engine = engine_of(ns.deepspeed, ns.fsdp_config)
    if str(getattr(ns, "init_lora_weights", "true")).lower() == "loftq" and (ns.use_lora or ns.q_lora):
        settings.problems += loftq_problems(settings.quant_method, bool(getattr(ns, "use_dora", False)),
                                            bool(ns.lora_weight_path), settings.engine.shards_parameters)
    if ns.deepspeed:
        resolve_deepspeed(ns, settings, env)
    resolve_fsdp(ns, settings, env)
    resolve_distributed(ns, settings, machine, env)
    resolve_fp32_trainables(ns, settings)
    settings.signal_lead, problem = signal_lead(env)
    settings.problems += [problem] if problem else []
    if ns.warmup_ratio is not None and FINETUNE["warmup_ratio"].contains(ns.warmup_ratio):
        settings.training["warmup_steps"] = ns.warmup_ratio  # transformers 5: warmup_steps < 1 is a ratio
    if ns.include_num_input_tokens_seen in ("no", False, None):
        # Real-token throughput in metrics.json: the Trainer counts non-padding tokens over all ranks.
        settings.training["include_num_input_tokens_seen"] = "non_padding"
    ckpt = ns.activation_checkpointing or ns.gradient_checkpointing
    if ckpt and not (ns.activation_checkpointing_kwargs or ns.gradient_checkpointing_kwargs):
        settings.training["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    return settings
