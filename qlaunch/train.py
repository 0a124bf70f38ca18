"""Build the Trainer, run it (with resume), save the adapter and the run's record."""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess

import torch
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from qlaunch.data.collate import PaddingCollator

log = logging.getLogger("qlaunch")


def make_collator(tokenizer, on_gpu: bool) -> PaddingCollator:
    """Dynamic padding to the longest sample of each batch; padded labels are -100."""
    # Multiples of 8 keep tensor-core friendly shapes on GPUs.
    return PaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of=8 if on_gpu else None)


def build_trainer(config, model, tokenizer, train_dataset, eval_dataset=None, callbacks=()):
    args = config.training
    return Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=make_collator(tokenizer, on_gpu=not args.use_cpu and torch.cuda.is_available()),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )


def resume_request(resume_from_checkpoint, env) -> str | None:
    """--resume_from_checkpoint, or `auto` when torchrun restarted the workers (MAX_RESTARTS):
    an elastic restart continues from the newest checkpoint, as a SLURM requeue does."""
    if resume_from_checkpoint in (None, "", False) and int(env.get("TORCHELASTIC_RESTART_COUNT") or 0) > 0:
        log.info("Elastic restart %s: resuming from the newest checkpoint (--resume_from_checkpoint auto).",
                 env["TORCHELASTIC_RESTART_COUNT"])
        return "auto"
    return resume_from_checkpoint


def resolve_resume(resume_from_checkpoint, output_dir: str):
    """`auto`: the newest checkpoint-* in output_dir if there is one, else a fresh start."""
    if resume_from_checkpoint in (None, "", False):
        return None
    if str(resume_from_checkpoint).lower() in ("auto", "true", "last"):
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last:
            log.info("Resuming from %s", last)
        else:
            log.info("No checkpoint in %s: starting from scratch.", output_dir)
        return last
    return resume_from_checkpoint


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
        "base_model": config.model.model_name_or_path,
        "trust_remote_code": config.model.trust_remote_code,  # chat / evaluate / merge need it too
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
