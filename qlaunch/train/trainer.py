"""Build the Trainer, run it (with resume), save the adapter and the run's record."""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess

import torch
from transformers import Trainer

from qlaunch.data.collate import PaddingCollator, compile_padding, flattens_packed_rows
from qlaunch.config.resume import requested
from qlaunch.train.checkpoints import AtomicCheckpointMixin, newest_complete_checkpoint
from qlaunch.train.fsdp import Fsdp2Mixin
from qlaunch.train.loss import LabelledLogitsMixin, labelled_logits_unsupported
from qlaunch.train.metrics import DeviceGradNormMixin, TrainedTokenCountMixin
from qlaunch.train.optim import LoraPlusMixin
from qlaunch.train.sampling import KnownLengthsMixin

log = logging.getLogger("qlaunch")


def make_collator(tokenizer, on_gpu: bool, attn_implementation: str | None = None,
                  pad_to_multiple_of: int | None = None) -> PaddingCollator:
    """Dynamic padding to the longest sample of each batch; padded labels are -100. Packed batches
    become one row for flash-attention (collate.flattens_packed_rows). pad_to_multiple_of: for --torch_compile
    (collate.compile_padding)."""
    # Multiples of 8 keep tensor-core friendly shapes on GPUs.
    return PaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of=pad_to_multiple_of or (8 if on_gpu else None),
                           flatten_packed=flattens_packed_rows(attn_implementation))


class QlaunchTrainer(Fsdp2Mixin, AtomicCheckpointMixin, TrainedTokenCountMixin, LabelledLogitsMixin, LoraPlusMixin,
                     KnownLengthsMixin, DeviceGradNormMixin, Trainer):
    """transformers' Trainer with atomic checkpoints (qlaunch/train/checkpoints.py), a count of the
    trained tokens (qlaunch/train/metrics.py), logits only at labelled positions (qlaunch/train/loss.py)
    FSDP2 on CPU worlds as on GPUs (qlaunch/train/fsdp.py), LoRA+ learning-rate groups (qlaunch/train/optim.py) and
    --group_by_length from the lengths the data already has (qlaunch/train/sampling.py); the gradient norm stays on the
    device until logged (qlaunch/train/metrics.py)."""


def build_trainer(config, model, tokenizer, train_dataset, eval_dataset=None, callbacks=(), rank0_weights=None):
    """rank0_weights: rank 0's tensors of a base loaded there only (qlaunch.model.rank0_load), sent to the shards
    once FSDP2 has sharded the model."""
    args = config.training
    trainer = QlaunchTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=make_collator(tokenizer, on_gpu=not args.use_cpu and torch.cuda.is_available(),
                                    attn_implementation=getattr(model.config, "_attn_implementation", None),
                                    pad_to_multiple_of=compile_padding(args.torch_compile, config.data.packing,
                                                                       args.model_max_length)),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    trainer.rank0_weights = rank0_weights
    if config.lora.use_lora and getattr(config.lora, "loraplus_lr_ratio", None):
        trainer.loraplus_lr_ratio = config.lora.loraplus_lr_ratio
    if args.labelled_logits_only:
        reason = labelled_logits_unsupported(model, args)
        if reason:
            log.info("Logits at every position (%s): --labelled_logits_only is off for this run.", reason)
        trainer.labelled_logits_only = reason is None
    return trainer


RESTART_COUNTS = {"TORCHELASTIC_RESTART_COUNT": "Elastic restart", "SLURM_RESTART_COUNT": "SLURM requeue"}


def resume_request(resume_from_checkpoint, env) -> str | None:
    """--resume_from_checkpoint, or `auto` when this run is a restart: torchrun restarted the workers
    (MAX_RESTARTS), or SLURM requeued the job (after a preemption checkpoint). The SLURM launcher passes
    `auto` itself; a plain `srun python finetune.py` batch script, one task per GPU, gets it here."""
    if resume_from_checkpoint not in (None, "", False):
        return resume_from_checkpoint
    for name, what in RESTART_COUNTS.items():
        count = env.get(name) or "0"
        if count.isdigit() and int(count) > 0:
            log.info("%s %s: resuming from the newest checkpoint (--resume_from_checkpoint auto).", what, count)
            return "auto"
    return resume_from_checkpoint


def resolve_resume(resume_from_checkpoint, output_dir: str):
    """`auto`: the newest checkpoint-* in output_dir if there is one, else a fresh start."""
    wanted = requested(resume_from_checkpoint)
    if wanted is None:
        return None
    if wanted == "auto":
        last = newest_complete_checkpoint(output_dir)
        if last:
            log.info("Resuming from %s", last)
        else:
            log.info("No checkpoint in %s: starting from scratch.", output_dir)
        return last
    return wanted


def unseen_checkpoint_problem(checkpoint: str | None, seen: list[bool]) -> str | None:
    """The refusal when some ranks cannot see the checkpoint rank 0 chose (seen[r]: rank r sees it)."""
    missing = [rank for rank, ok in enumerate(seen) if not ok]
    if checkpoint is None or not missing:
        return None
    ranks = f"rank {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    return (f"--resume_from_checkpoint: {ranks} cannot see {checkpoint!r}, which rank 0 resumes from (a "
            "node-local --output_dir, or a shared filesystem that lags): put --output_dir on storage every "
            "node sees, or copy the checkpoint to the same path on every node.")


def agreed_resume(request, output_dir: str):
    """One rank decides, all follow: rank 0 resolves the checkpoint (resolve_resume) and every rank
    resumes from its answer. A rank that chose by itself could restart at step 0 beside ranks at step
    N (node-local directories, NFS lag): learning rates differ, weights drift, the run hangs at the end.
    Every rank that cannot see the chosen checkpoint makes all of them refuse together (UsageError)."""
    import torch.distributed as dist

    from qlaunch.config.errors import UsageError

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        choice = resolve_resume(request, output_dir)
        seen = [choice is None or os.path.isdir(choice)]
    else:
        box = [resolve_resume(request, output_dir) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        choice = box[0]
        seen = [None] * dist.get_world_size()
        dist.all_gather_object(seen, choice is None or os.path.isdir(choice))
    problem = unseen_checkpoint_problem(choice, seen)
    if problem:
        raise UsageError(problem)
    return choice


def finished_checkpoint(checkpoint: str | None) -> bool:
    """Whether the checkpoint is the run's last step (its trainer state reached max_steps)."""
    if not checkpoint:
        return False
    path = os.path.join(checkpoint, "trainer_state.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        state = json.load(f)
    return state.get("max_steps", 0) > 0 and state.get("global_step", 0) >= state["max_steps"]


def train_or_finish(trainer, resume: str | None):
    """trainer.train(), except when resuming from the run's last checkpoint (killed between the
    last checkpoint and the final save): transformers would then train one step past max_steps.
    The checkpoint's weights and state are loaded instead, and the run goes on to its final save."""
    if finished_checkpoint(resume) and not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled):
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput

        log.info("%s is the run's last step: nothing left to train; saving it as the result.", resume)
        trainer._load_from_checkpoint(resume)  # the Trainer's own loader (adapter-aware)
        trainer.state = TrainerState.load_from_json(os.path.join(resume, "trainer_state.json"))
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return TrainOutput(trainer.state.global_step, sum(losses) / len(losses) if losses else float("nan"), {})
    return trainer.train(resume_from_checkpoint=resume)


def requeue_if_slurm() -> bool:
    """After a preemption checkpoint, put the SLURM job back in the queue (rank 0 only)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or int(os.environ.get("RANK", "0")) != 0:
        return False
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode == 0:
        log.warning("Requeued SLURM job %s; it resumes from the checkpoint with --resume_from_checkpoint auto.", job)
        return True
    log.warning("scontrol requeue %s failed: %s", job, result.stderr.strip())
    return False


def run_info(config, trainer, trainable: int, total: int, targets) -> dict:
    import peft
    import transformers

    args = trainer.args
    return {
        "world_size": args.world_size,
        "process_index": args.process_index,
        "device": str(args.device),
        "distributed": str(args.parallel_mode),
        "ddp_backend": args.ddp_backend,
        "deepspeed": bool(args.deepspeed),
        "engine": config.settings.engine.label if config.settings else "DDP",
        "base_model": config.model.model_name_or_path,
        "trust_remote_code": config.model.trust_remote_code,  # chat / evaluate / merge need it too
        "data_path": os.path.abspath(config.data.data_path) if config.data.data_path else None,  # merge probes
        "quant_method": config.quant_method,
        "bnb_4bit_use_double_quant": config.lora.bnb_4bit_use_double_quant if config.quant_method else None,
        "compute_dtype": str(config.compute_dtype).replace("torch.", ""),
        "fp16": args.fp16,
        "bf16": args.bf16,
        "use_lora": config.lora.use_lora,
        "lora_target_modules": targets,
        "trainable_params": trainable,
        "total_params": total,
        "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "host": platform.node(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }


def save_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
