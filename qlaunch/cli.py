"""finetune.py: parse → validate → load → train → save → report."""
from __future__ import annotations

import logging
import os
import sys

from qlaunch.errors import UsageError

log = logging.getLogger("qlaunch")


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    handler = logging.StreamHandler(sys.stderr)
    prefix = "[qlaunch]" if rank == 0 else f"[qlaunch rank {rank}]"
    handler.setFormatter(logging.Formatter(f"{prefix} %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False


def prepare(argv=None):
    """Arguments → validated Config. Raises UsageError listing every problem."""
    from qlaunch.config import build_config, parse_namespace
    from qlaunch.validate import validate_args

    namespace = parse_namespace(argv)
    problems = validate_args(namespace)
    if problems:
        raise UsageError(problems)
    return build_config(namespace)


def is_zero3(training_args) -> bool:
    plugin = getattr(training_args, "hf_deepspeed_config", None)
    return bool(plugin and plugin.is_zero3())


def fit(config, extra_callbacks=()):
    """Load, train, save and report. Returns the Trainer (None for --dry_run)."""
    from qlaunch import model as modeling
    from qlaunch.data.dataset import build_dataset
    from qlaunch.report import write_report
    from qlaunch.train import build_trainer, requeue_if_slurm, resolve_resume, run_info, save_json

    margs, dargs, largs, targs = config.model, config.data, config.lora, config.training
    for note in config.notes:
        log.info(note)
    for warning in config.warnings:
        log.warning(warning)

    tokenizer = modeling.load_tokenizer(margs.model_name_or_path, margs.trust_remote_code)
    data_kwargs = dict(
        max_length=targs.model_max_length,
        system_message=dargs.system_message,
        truncation=dargs.truncation,
        lazy=dargs.lazy_preprocess,
        show_progress=targs.process_index == 0,
    )
    with targs.main_process_first(desc="tokenizing"):
        train_dataset = build_dataset(dargs.data_path, tokenizer, **data_kwargs)
        eval_dataset = build_dataset(dargs.eval_data_path, tokenizer, **data_kwargs) if dargs.eval_data_path else None

    if targs.dry_run:
        import yaml

        effective = {"quant_method": config.quant_method, "compute_dtype": str(config.compute_dtype)}
        effective.update(config.non_default())
        log.info("Effective configuration (non-default values):\n%s", yaml.safe_dump(effective, sort_keys=True))
        from qlaunch.plan import format_plan, memory_plan

        log.info("%s", format_plan(memory_plan(config)))
        log.info("--dry_run: configuration and data are valid; exiting before loading the model.")
        return None

    # Seed before the model exists: LoRA's A matrices are drawn at attach time, before the Trainer seeds.
    from transformers import set_seed

    set_seed(targs.seed)
    if is_zero3(targs):
        # from_pretrained under ZeRO-3 builds deepspeed.zero.Init, which reads the world size from
        # DeepSpeed's comm layer: initialise it first, or it sees 1 process and rejects the batch size.
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo" if targs.use_cpu else None)
    model = modeling.load_base_model(
        margs, largs, config.quant_method, config.compute_dtype,
        use_cpu=targs.use_cpu, zero3=is_zero3(targs),
    )
    targets = None
    if largs.use_lora:
        model = modeling.attach_lora(
            model, largs, quant_method=config.quant_method, gradient_checkpointing=targs.activation_checkpointing
        )
        targets = sorted(next(iter(model.peft_config.values())).target_modules)
    elif targs.activation_checkpointing:
        model.enable_input_require_grads()
    trainable, total = modeling.count_parameters(model)
    log.info("Trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))

    trainer = build_trainer(config, model, tokenizer, train_dataset, eval_dataset, extra_callbacks)
    info = run_info(config, trainer, trainable, total, targets)
    if config.quant_method in ("nf4", "fp4"):
        from qlaunch.footprint import quantized_storage

        info["quantized_storage"] = storage = quantized_storage(model)
        log.info("%s base: %d 4-bit layers, %.3f stored bits/param (weights + quantization state; "
                 "the fixed per-tensor state dominates on small layers)",
                 config.quant_method.upper(), storage["layers"], storage["bits_per_param"])
    log.info("World size %d (%s), device %s", info["world_size"], info["distributed"], info["device"])

    resume = resolve_resume(targs.resume_from_checkpoint, targs.output_dir)
    result = trainer.train(resume_from_checkpoint=resume)

    trainer.qlaunch_result = result
    guard, preemption = trainer.qlaunch_guard, trainer.qlaunch_preemption
    if guard.bad_step is not None:
        log.error(guard.message())
        return trainer
    if preemption.received:
        log.warning("Stopped by %s at step %s; checkpoint saved in %s.",
                    preemption.received, preemption.stopped_at_step, targs.output_dir)
        requeue_if_slurm()
        return trainer

    trainer.save_model(targs.output_dir)  # adapter only for LoRA (gathered under ZeRO-3), + tokenizer
    metrics = dict(result.metrics)
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
    if trainer.is_world_process_zero():
        info["train_samples"] = len(train_dataset)
        save_json(os.path.join(targs.output_dir, "run_info.json"), info)
        title = f"{os.path.basename(margs.model_name_or_path.rstrip('/'))} · {config.quant_method or 'full precision'}"
        write_report(targs.output_dir, metrics, trainer.state.log_history, title)
        log.info("Saved %s to %s (metrics.json, loss_curve.png, run_info.json)",
                 "adapter" if largs.use_lora else "model", targs.output_dir)
    return trainer


def run(config, extra_callbacks=()) -> int:
    """Exit code of a run: 0 done (or preempted and checkpointed), 1 non-finite loss."""
    trainer = fit(config, extra_callbacks)
    if trainer is not None and trainer.qlaunch_guard.bad_step is not None:
        return 1
    return 0


def main(argv=None) -> None:
    setup_logging()
    try:
        config = prepare(argv)
        code = run(config)
    except UsageError as e:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(e.render(), file=sys.stderr)
        sys.exit(2)
    sys.exit(code)
