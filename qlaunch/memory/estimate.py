"""Where a training step's memory goes, per device, from first principles.

A pure function of the model's shape (qlaunch.memory.shape) and the job's settings (`Job`): every term
is a count of tensors times their bytes, following what the libraries allocate (read in their
sources: transformers 5, peft 0.21, bitsandbytes 0.50, gptqmodel 7.6, torch 2.x autograd). The
peak is the largest of three moments of a step, each on top of what persists (weights, adapter,
gradients, optimizer state, CUDA context):
  * the loss: every checkpointed block input (or every block's activations) plus the logits chain,
  * the first block's backward: the same, with that block recomputed and its gradients in flight,
  * the optimizer step: the update's temporaries.
Nothing here is fitted to measurements; the two environment facts (CUDA context, CPU process
baseline) are what an idle process holds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from qlaunch.memory.experts import (largest_16bit_load_unit, packed_bytes_of, packed_experts_bytes,
                                    routed_experts_bytes)
from qlaunch.memory.shape import Shape

GiB = 1024**3
# An idle PyTorch CUDA process (driver context, cuBLAS/cuBLASLt workspaces, lazily loaded kernels)
# shows ~0.5-0.6 GiB in nvidia-smi on Ampere/Hopper; one DeepSpeed/NCCL process adds its buffers.
CUDA_CONTEXT_BYTES = int(0.6 * GiB)
NCCL_BYTES = int(0.25 * GiB)
# Peak RSS of a CPU training process before the model: Python + torch + transformers + peft + the
# Trainer imported (measured here: ~0.55-0.7 GiB).
CPU_BASELINE_BYTES = int(0.6 * GiB)
# The caching allocator keeps blocks freed by one phase that are too small for the next request
# (the logits chain grows 2 -> 4 -> 4 bytes/element): this share of the transient peak is reserved
# but not allocated. Not used on CPU (glibc returns large blocks to the OS).
FRAGMENTATION = 0.05

NF4_BLOCK, NF4_NESTED_BLOCK = 64, 256


@dataclass(frozen=True)
class Job:
    """The settings that decide memory (read from flags + resolved settings by qlaunch.memory.planner)."""

    quant: str | None = None  # None | nf4 | fp4 | gptq
    double_quant: bool = True
    compute_bytes: int = 2  # autocast dtype (4: fp32, no autocast)
    base_bytes: int = 2  # dtype the full-precision base is loaded in
    use_lora: bool = True
    lora_r: int = 64
    lora_targets: tuple[str, ...] = ()  # empty: every block projection (qlaunch's default)
    parameter_lora: tuple[tuple[int, int], ...] = ()  # (rows, cols) of LoRA's A and B on --lora_target_parameters
    lora_dropout: float = 0.05
    dora: bool = False  # DoRA: a trained magnitude per output, the weight's norm recomputed every forward
    modules_to_save: tuple[str, ...] = ()
    fp32_trainables: bool = False
    optim: str = "adamw_torch"
    micro_batch: int = 1
    seq_len: int = 512  # tokens per row of the largest batch
    logits_fraction: float = 1.0  # share of positions whose logits are computed
    checkpointing: bool = True
    attention: str = "sdpa"  # sdpa | flash_attention_2 | eager
    packing: bool = False  # packed rows (samples isolated by position ids)
    engine: str = "ddp"  # ddp | deepspeed | fsdp2 (qlaunch.config.engine)
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    reuse_distance: int = 1_000_000_000  # ZeRO-3's stage3_max_reuse_distance, in elements
    world_size: int = 1
    cuda: bool = True


@dataclass
class Plan:
    persistent: dict = field(default_factory=dict)  # bytes held for the whole step
    phases: dict = field(default_factory=dict)  # bytes on top, per moment of the step
    transient: dict = field(default_factory=dict)  # the parts of the peak phase
    counts: dict = field(default_factory=dict)
    peak_phase: str = ""
    peak_bytes: int = 0
    load: dict = field(default_factory=dict)  # bytes per device while the model loads, by part
    load_bytes: int = 0
    load_host: dict = field(default_factory=dict)  # host bytes per rank while loading, when not the device


def nf4_bytes(n: int, double_quant: bool) -> float:
    """Packed 4-bit codes + absmax per 64 weights (double quant: uint8 absmax + fp32 per 256 of them
    + a 256-entry fp32 code), + the 16-entry fp32 NF4 code. bench/nf4_bits.py measures the same."""
    blocks = math.ceil(n / NF4_BLOCK)
    state = 16 * 4
    if double_quant:
        state += blocks + math.ceil(blocks / NF4_NESTED_BLOCK) * 4 + 256 * 4 + 4
    else:
        state += blocks * 4
    return n / 2 + state


def gptq_bytes(n_in: int, n_out: int, bias: bool, gptq: dict, training: bool = True) -> float:
    """int32-packed weights and zeros, fp16 scales per group, int32 g_idx per input; gptqmodel's torch
    kernel keeps a second (v1) copy of the zeros while training."""
    bits, group = gptq.get("bits", 4), gptq.get("group_size", 128)
    groups = math.ceil(n_in / (n_in if group in (-1, 0) else group))
    zeros = groups * n_out * bits / 8
    return (n_in * n_out * bits / 8 + zeros * (2 if training else 1) + groups * n_out * 2 + n_in * 4
            + (n_out * 2 if bias else 0))


def optimizer_state_bytes(optim: str, params: int, param_bytes: int, matrices=()) -> tuple[float, float]:
    """(state bytes, step temporaries) of `params` trainable parameters.

    torch AdamW: two moments in the parameter's dtype; its foreach step allocates sqrt(v) once.
    bitsandbytes 8-bit: two uint8 moments + an fp32 absmax per 2048 (lion: one moment); fused kernels.
    Adafactor: factored second moment, rows + cols per matrix."""
    o = optim.lower()
    if "8bit" in o:
        moments = 1 if "lion" in o else 2
        return moments * (params + params / 2048 * 4), 0.0
    if "adafactor" in o:
        return sum((r + c) * 4 for r, c in matrices), 0.0
    if o.startswith("sgd"):
        return 0.0, 0.0
    if "lion" in o or "adagrad" in o or "rmsprop" in o:
        return params * param_bytes, 0.0
    # torch's foreach AdamW allocates sqrt(v) once per step; fused and bnb kernels update in place
    step = 0.0 if o.startswith("paged") or "bnb" in o or "fused" in o else params * param_bytes
    return 2 * params * param_bytes, step


def _lora(shape: Shape, job: Job) -> tuple[int, list[tuple[int, int]], list]:
    """LoRA parameter count, its matrices, and the adapted projections of one block."""
    targets = set(job.lora_targets)
    adapted = [lin for lin in shape.block if not targets or lin.name in targets]
    params = shape.layers * sum(job.lora_r * (lin.n_in + lin.n_out) + (lin.n_out if job.dora else 0)
                                for lin in adapted)
    matrices = [(job.lora_r, lin.n_in) for lin in adapted] + [(lin.n_out, job.lora_r) for lin in adapted]
    # LoRA on parameters (MoE experts) is given whole-model: every targeted parameter of every layer
    params += sum(rows * cols for rows, cols in job.parameter_lora)
    return params, matrices * shape.layers + list(job.parameter_lora), adapted


def _saved_copies(shape: Shape, job: Job) -> dict:
    """Bytes per module that a frozen embedding/lm_head copy trained in full (modules_to_save) takes."""
    sizes = {}
    for name in job.modules_to_save:
        if name in shape.embedding_names or name == shape.output_name:
            sizes[name] = shape.embedding_params
    return sizes


def block_activation_bytes(shape: Shape, job: Job, adapted, tokens: int, rows: int) -> dict:
    """What autograd keeps for one decoder block's backward, by tensor (bytes)."""
    c, h, i = job.compute_bytes, shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    kbit = job.quant in ("nf4", "fp4")
    autocast = job.cuda and c < 4
    out = {}
    # RMSNorm computes in fp32 and keeps its fp32 input (x2 norms); under k-bit prep its weight is
    # fp32, so the output is fp32 and the 4-bit layers cast a compute-dtype copy of it.
    out["norms"] = 2 * 4 * h * tokens
    out["projection inputs"] = 2 * c * h * tokens + (2 * c * h * tokens if kbit and c < 4 else 0)
    out["q, k, v (attention inputs)"] = c * (q + 2 * kv) * tokens
    out["attention output + o_proj input"] = 2 * c * q * tokens + 4 * shape.heads * tokens
    if job.attention == "eager":  # the (rows, heads, s, s) probabilities: fp32 softmax + the cast copy
        out["attention matrices (eager)"] = (4 + c) * shape.heads * rows * job.seq_len ** 2
    if shape.fused_experts and shape.experts_per_token:
        out.update(routed_experts_bytes(shape, c, tokens))
    else:
        out["mlp intermediates"] = (4 if shape.gated_mlp else 2) * c * i * tokens
    if job.use_lora:
        # Each adapter gets its own copy of its input: peft casts to the fp32 adapter dtype and
        # autocast casts back for the matmul (or dropout's output on fp32); dropout keeps a mask.
        per_token = 0
        for lin in adapted:
            copy = c if autocast else (4 if job.lora_dropout > 0 else 0)
            per_token += lin.n_in * (copy + (1 if job.lora_dropout > 0 else 0)) + job.lora_r * 4
        out["LoRA adapter inputs"] = per_token * tokens
    if job.quant == "gptq":  # torch kernel: matmul(x, dequantized W) keeps W for the input gradient
        out["dequantized GPTQ weights"] = 2 * shape.block_weights
    return out


def attention_mask_bytes(job: Job) -> int:
    """The (rows, 1, L, L) mask transformers materialises once per forward and hands to every layer
    (transformers/masking_utils.py), kept until the backward ends. sdpa builds a boolean one only when it
    cannot use is_causal — padding (several rows of different lengths) or packed samples; eager always
    builds an additive one in the compute dtype; flash attention builds none (sample boundaries go in as
    sequence lengths). 1 GiB at 1 x 32k tokens with sdpa."""
    cells = job.micro_batch * job.seq_len ** 2
    if job.attention == "eager":
        return cells * job.compute_bytes
    if job.attention == "sdpa" and (job.packing or job.micro_batch > 1):
        return cells
    return 0


def logits_bytes(shape: Shape, job: Job, positions: int) -> dict:
    """The loss chain over the vocabulary: logits in the compute dtype, their fp32 copy (transformers'
    loss upcasts), log_softmax's fp32 output (kept for backward); in backward its gradient and the
    input gradient are both fp32: 12 bytes per logit."""
    c, v = job.compute_bytes, shape.vocab * positions
    forward = c * v + (4 * v if c < 4 else 0) + 4 * v + (c * v if shape.remote_loss else 0)
    backward = 12 * v
    return {"forward": forward, "backward": backward, "peak": max(forward, backward)}


def plan_memory(shape: Shape, job: Job) -> Plan:
    plan = Plan()
    h, layers, c = shape.hidden, shape.layers, job.compute_bytes
    kbit = job.quant in ("nf4", "fp4")
    block_nf4 = sum(nf4_bytes(lin.n_in * lin.n_out, job.double_quant) for lin in shape.block)  # one block, 4-bit
    deepspeed = job.zero_stage > 0
    fsdp = job.engine == "fsdp2"
    n = max(job.world_size, 1)
    # FSDP2 (full shard) holds 1/N of every parameter, gradient and optimizer state; with CPU offload
    # the shards live in host memory and only the gathered units come to the device. ZeRO-3's
    # offload_param does the same for its parameter partitions (base and 16-bit trainables).
    shard = 1 / n if fsdp else 1.0
    on_device = 0.0 if (job.offload_params and (fsdp or job.zero_stage == 3)) else 1.0

    # Base weights. Non-quantized parameters (embeddings, lm_head, norms, biases): peft's
    # prepare_model_for_kbit_training upcasts them to fp32 for bnb, not for GPTQ (peft skips it);
    # DeepSpeed casts the module to the compute dtype.
    # NF4/FP4 on an MoE base: the fused 3-D experts, which bitsandbytes leaves alone, are packed per expert by
    # qlaunch (qlaunch.model.experts_4bit) and count with the quantized weights
    experts_4bit = shape.fused_expert_params if kbit else 0
    other = shape.total_params - shape.quantizable - experts_4bit
    if job.quant:
        if kbit:
            quant = layers * block_nf4 + packed_experts_bytes(shape, job.double_quant)
            other_bytes = c if deepspeed else 4
        else:
            quant = layers * sum(gptq_bytes(lin.n_in, lin.n_out, lin.bias, shape.gptq or {}) for lin in shape.block)
            other_bytes = job.base_bytes
        base = quant + other * other_bytes
    else:
        other_bytes = job.base_bytes
        base = shape.total_params * job.base_bytes
    frozen_share = 1 / n if (job.zero_stage == 3 or fsdp) else 1.0

    # Trainable parameters and their dtype.
    if job.use_lora:
        lora, matrices, adapted = _lora(shape, job)
        copies = _saved_copies(shape, job)
        copy_bytes = 4 if (job.fp32_trainables or (kbit and not deepspeed)) else job.base_bytes
        trainable = lora + sum(copies.values())
        trainable_bytes = lora * 4 + sum(copies.values()) * copy_bytes
        matrices += [(shape.vocab, h)] * len(copies)
    else:
        lora, adapted, copies = 0, list(shape.block), {}
        trainable, trainable_bytes = shape.total_params, base
        matrices = [(lin.n_out, lin.n_in) for lin in shape.block] * layers

    p = plan.persistent
    p["base weights"] = base * frozen_share * on_device if job.use_lora else 0
    if deepspeed:
        # ZeRO (mixed precision): 16-bit params (partitioned at stage 3), 16-bit grads (partitioned
        # from stage 2), fp32 master + two fp32 moments (12 bytes, partitioned from stage 1) and the
        # fp32 gradient partition at the step; offload moves the fp32 part to CPU memory.
        p["trainable parameters (16-bit)"] = 2 * trainable * (1 / n * on_device if job.zero_stage == 3 else 1)
        p["gradients"] = 2 * trainable * (1 / n if job.zero_stage >= 2 else 1)
        state, step = (0.0, 0.0) if job.offload_optimizer else (12 * trainable / n, 4 * trainable / n)
        p["optimizer state (fp32 master + moments)"] = state
        p["ZeRO buckets"] = 2 * 2 * min(trainable, 2e8)  # reduce + allgather buckets (2e8 elements, 16-bit)
        step_temp = step
    else:
        p["trainable parameters"] = trainable_bytes * shard * on_device
        p["gradients"] = trainable_bytes * shard * on_device
        param_bytes = trainable_bytes / trainable if trainable else 4
        state, step_temp = optimizer_state_bytes(job.optim, trainable, param_bytes, matrices)
        p["optimizer state"] = state * shard * on_device
        step_temp *= shard * on_device
        if n > 1 and not fsdp:  # DDP reduces through bucket copies of the gradients (gradient_as_bucket_view=False)
            p["DDP gradient buckets"] = trainable_bytes
    if job.cuda:
        p["CUDA context"] = CUDA_CONTEXT_BYTES + (NCCL_BYTES if n > 1 else 0)
    else:
        p["process baseline (CPU)"] = CPU_BASELINE_BYTES

    # Activations of one micro-batch.
    rows, tokens = job.micro_batch, job.micro_batch * job.seq_len
    block = block_activation_bytes(shape, job, adapted, tokens, rows)
    block_total = sum(block.values())
    residual = 4 if (kbit and not deepspeed) or c == 4 else c  # fp32 embeddings → fp32 residual stream
    positions = max(1, round(tokens * job.logits_fraction))
    logits = logits_bytes(shape, job, positions)
    if job.checkpointing:  # each block keeps only its input; one block is recomputed at a time
        kept = {"checkpointed block inputs": layers * residual * h * tokens}
        recompute = block
    else:
        gptq_all = block.get("dequantized GPTQ weights", 0) * layers
        kept = {"block activations (all layers)": layers * (block_total - block.get("dequantized GPTQ weights", 0))
                + gptq_all}
        recompute = {}
    # The output layer: with an fp32 lm_head (k-bit prep) autocast keeps a 16-bit copy of its weight.
    lm_head_copy = shape.embedding_params * c if (kbit and not deepspeed and c < 4) else 0
    # current + prefetched decoder block, gathered as stored: a 4-bit base's blocks stay packed (NF4 codes
    # in their float storage, GPTQ's packed tensors viewed as floats: qlaunch.model.gptq_shard). ZeRO-3 +
    # NF4 keeps the 16-bit block it was planned with (its published cells measured above the plan; the small
    # persistent parameters and the prefetch bucket are not modelled), or the reuse window below if larger.
    block_packed = block_nf4 if kbit else (quant / max(layers, 1) if job.quant == "gptq" else None)
    zero3_gather = 0
    if job.zero_stage == 3:
        zero3_gather = 2 * (block_packed if job.quant == "gptq" else shape.block_weights * 2)
        # DeepSpeed releases a gathered parameter after its module only when the module trace does not use it
        # again within stage3_max_reuse_distance elements (partitioned_param_coordinator, __params_to_release):
        # at the turn from forward to backward the last blocks stay gathered, up to that many elements of the
        # model as ZeRO-3 stores it (the compute dtype; 4-bit codes packed into it).
        stored_elements = (base / c if job.use_lora else shape.total_params) + trainable
        zero3_gather = max(zero3_gather, min(job.reuse_distance, stored_elements) * c)
    if fsdp:
        block_stored = ((block_packed if block_packed is not None else shape.block_weights * job.base_bytes)
                        + (lora * 4 / max(layers, 1) if job.use_lora else 0))
        zero3_gather = 2 * block_stored

    loss_phase = {**kept, "logits chain": logits["peak"]}
    if job.cuda and c < 4 and job.use_lora and not deepspeed:
        # autocast caches a 16-bit copy of every fp32 trainable weight until the forward ends
        loss_phase["autocast copies of trainable weights"] = trainable * c
    if lm_head_copy:
        loss_phase["lm_head 16-bit copy"] = lm_head_copy
    # Backward through one block: its saved tensors, the incoming/outgoing residual gradients and the
    # widest gradient temporaries (MLP intermediate); 4-bit kernels dequantize one weight at a time.
    largest = max(lin.n_in * lin.n_out for lin in shape.block)
    working = 2 * residual * h * tokens + 2 * c * shape.intermediate * tokens
    dequant = largest * c if kbit else (largest * 5 if job.quant == "gptq" else 0)  # int32 unpack + int8 codes
    block_phase = {**kept, **{f"recomputed block: {k}": v for k, v in recompute.items()},
                   "backward working set": working}
    if dequant:
        block_phase["4-bit dequantization workspace"] = dequant
    if job.use_lora and job.dora:
        # peft's DoRA forms each adapted weight whole to take its column norms: the (dequantized) weight in the
        # compute dtype, B @ A and their sum in fp32 — one layer at a time, freed before the next
        block_phase["DoRA weight norm (one layer)"] = largest * (c + 4 + 4)
    if zero3_gather:
        label = "FSDP2 gathered blocks" if fsdp else "ZeRO-3 gathered blocks"
        loss_phase[label] = block_phase[label] = zero3_gather
    mask = attention_mask_bytes(job)
    if mask:
        loss_phase["attention mask (rows, 1, L, L)"] = block_phase["attention mask (rows, 1, L, L)"] = mask
    if fsdp and n > 1:  # the output unit (final norm + lm_head) stays gathered from the forward's end into backward
        loss_phase["FSDP2 gathered lm_head"] = shape.embedding_params * (4 if kbit else job.base_bytes) * (1 - 1 / n)
    step_phase = {"optimizer step temporaries": step_temp}
    plan.phases = {"loss": loss_phase, "block backward": block_phase, "optimizer step": step_phase}

    persistent = sum(p.values())
    frag = FRAGMENTATION if job.cuda else 0.0
    totals = {name: persistent + sum(parts.values()) * (1 + frag) for name, parts in plan.phases.items()}
    plan.peak_phase = max(totals, key=totals.get)
    plan.peak_bytes = int(totals[plan.peak_phase])
    plan.transient = dict(plan.phases[plan.peak_phase])
    if frag:
        plan.transient["allocator fragmentation"] = sum(plan.phases[plan.peak_phase].values()) * frag
    plan.load = load_parts(shape, job, quant if job.quant else 0, other, p)
    plan.load_bytes = int(sum(plan.load.values()))
    plan.load_host = load_host_parts(shape, job, quant if job.quant else 0, other)
    plan.counts = {
        "parameters": shape.total_params,
        "quantized_parameters": shape.quantizable + experts_4bit if job.quant else 0,
        "trainable_parameters": trainable,
        "lora_parameters": lora,
        "tokens_per_micro_batch": tokens,
        "logit_positions": positions,
    }
    return plan


def load_parts(shape: Shape, job: Job, quant_bytes: float, other: int, persistent: dict) -> dict:
    """What one device holds while the model loads, before the engine shards anything (bytes by part).

    4-bit bases take transformers' quantized path, which builds no deepspeed.zero.Init, and bitsandbytes
    places the whole quantized model on each rank's device; peft's k-bit preparation then upcasts every
    non-quantized parameter (embeddings, lm_head, norms) to fp32 there. FSDP2 and multi-process ZeRO-3
    build a 4-bit base in host memory instead (see load_host_parts) and the GPU receives shards
    (qlaunch.model.rank0_load, qlaunch.model.zero3_init). A full-precision
    base loads partitioned under ZeRO-3 (zero.Init), to host memory and then sharded onto the device
    under FSDP2 (no device map; accelerate moves the shards), and whole on the device otherwise."""
    n = max(job.world_size, 1)
    fixed = {k: v for k, v in persistent.items() if k in ("CUDA context", "process baseline (CPU)")}
    largest = max(lin.n_in * lin.n_out for lin in shape.block)
    if sharded_host_load(job):
        # Built in host memory (qlaunch.model.load.device_map_for). fully_shard moves one unit at a time
        # to the GPU (a decoder block, or the embeddings / lm_head) and keeps 1/N of it there; zero.Init moves
        # one parameter at a time and keeps 1/N of it (in the engine's dtype, or in host memory with
        # offload_param). FSDP2 keeps non-quantized weights in fp32 after bnb's k-bit preparation, in the
        # compute dtype for GPTQ (peft skips it).
        on_device = 0.0 if job.offload_params else 1.0
        fsdp, kbit = job.engine == "fsdp2", job.quant in ("nf4", "fp4")
        other_bytes = 4 if fsdp and kbit else job.base_bytes
        embedding = shape.embedding_params * other_bytes
        stacks = [packed_bytes_of(stack, job.double_quant) for stack in shape.fused_experts] if kbit else [0]
        unit = max(quant_bytes / max(shape.layers, 1), embedding) if fsdp else max(largest / 2, embedding, *stacks)
        parts = {**fixed, "4-bit base shards (1/N)": quant_bytes / n * on_device,
                 f"non-quantized weight shards, {'fp32' if other_bytes == 4 else '16-bit'} (1/N)":
                     other * other_bytes / n * on_device,
                 f"one {'unit' if fsdp else 'parameter'} moved whole before sharding": unit}
        if kbit and shape.fused_experts:  # rank 0 packs each expert stack on its GPU (qlaunch.model.load)
            parts["rank 0: one expert stack being quantized (16-bit)"] = largest_16bit_load_unit(shape, job) * job.base_bytes
        return parts
    if job.quant in ("nf4", "fp4"):
        stack = bool(shape.fused_experts)
        parts = {**fixed, "4-bit base, whole on every rank": quant_bytes,
                 "non-quantized weights, fp32 after k-bit preparation": other * 4,
                 f"one {'expert stack' if stack else 'projection'} being quantized (16-bit)":
                     largest_16bit_load_unit(shape, job) * job.base_bytes}
        if not job.cuda:  # on a CPU the device is the host: the checkpoint read to quantize is memory-mapped
            # and its pages stay resident (file-backed; the unquantized zero-copy tensors keep the mapping)
            parts["full-precision checkpoint, memory-mapped"] = shape.total_params * shape.checkpoint_bytes
        return parts
    if job.quant == "gptq":  # one-process ZeRO-3 too: DeepSpeed moves the whole module to the device
        return {**fixed, "GPTQ base, whole on every rank": quant_bytes + other * job.base_bytes}
    full = shape.total_params * job.base_bytes
    if job.zero_stage == 3 or job.engine == "fsdp2":
        return {**fixed, "base, partitioned at load": full / n + largest * job.base_bytes}
    return {**fixed, "base, whole on every rank": full}


def sharded_host_load(job: Job) -> bool:
    """A 4-bit base built in host memory on rank 0 and sent to the GPUs as shards: FSDP2, and ZeRO-3 with
    more than one process (qlaunch.config.resolve sets rank0_load for both)."""
    return bool(job.quant) and job.cuda and (job.engine == "fsdp2" or (job.zero_stage == 3 and job.world_size > 1))


def load_host_parts(shape: Shape, job: Job, quant_bytes: float, other: int) -> dict:
    """Host memory while a GPU job loads, where the base is built there (sharded_host_load): rank 0 reads it
    whole (4-bit, with its non-quantized weights) and keeps it until every rank has its shards; the other
    ranks hold only the quantization state of the skeleton they are sent (qlaunch.model.rank0_load)."""
    if job.quant in ("nf4", "fp4") and shape.fused_experts and job.cuda and not sharded_host_load(job):
        # built in host memory (qlaunch.model.load.device_map_for): the experts 16-bit until each stack is
        # quantized onto the GPU, then the rest of the model moves there
        return {"each rank: 4-bit block projections": quant_bytes - packed_experts_bytes(shape, job.double_quant),
                "each rank: fused experts, 16-bit until quantized": shape.fused_expert_params * job.base_bytes,
                "each rank: non-quantized weights, 16-bit": other * job.base_bytes}
    if not sharded_host_load(job):
        return {}
    if job.quant == "gptq":  # pre-quantized: nothing is quantized at load, and every packed tensor is a
        # parameter by the time the skeleton is taken (qlaunch.model.gptq_shard): the skeleton is ~empty
        return {"rank 0: 4-bit base, whole": quant_bytes,
                "rank 0: non-quantized weights, 16-bit": other * job.base_bytes}
    largest = max(lin.n_in * lin.n_out for lin in shape.block)
    packed = packed_experts_bytes(shape, job.double_quant)  # experts: one uint8/float parameter, no state
    state = max(quant_bytes - packed - shape.quantizable / 2, 0.0)
    parts = {"rank 0: 4-bit base, whole": quant_bytes, "rank 0: non-quantized weights, fp32": other * 4,
             "rank 0: one projection being quantized (16-bit)": largest * 2,
             "each other rank: quantization state of the skeleton": state}
    if shape.fused_experts:  # bitsandbytes leaves them 16-bit while loading; each stack is packed on the GPU
        parts["rank 0: fused experts, 16-bit until quantized"] = shape.fused_expert_params * job.base_bytes
    return parts
