"""finetune.py: parse → validate → load → train → save → report."""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from qlaunch.cluster.preemption import PreemptionSignals
from qlaunch.config.engine import Engine
from qlaunch.config.errors import UsageError

log = logging.getLogger("qlaunch")


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    handler = logging.StreamHandler(sys.stderr)
    prefix = "[qlaunch]" if rank == 0 else f"[qlaunch rank {rank}]"
    handler.setFormatter(logging.Formatter(f"{prefix} %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False


def use_srun_task_env() -> dict:
    """Started by plain srun, one task per GPU: the rank variables torchrun would have set (returned)."""
    from qlaunch.cluster.rendezvous import srun_task_env

    if "SLURM_STEP_NUM_TASKS" not in os.environ or "RANK" in os.environ:
        return {}
    from qlaunch.cluster.facts import node_addr, run_quietly

    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_NODELIST") or ""
    hosts = run_quietly(["scontrol", "show", "hostnames", nodes]).split() if nodes else []
    added = srun_task_env(os.environ, node_addr(hosts[0]) if hosts else None)
    os.environ.update(added)
    return added


def use_mpi_env() -> dict:
    """Started by mpirun / mpiexec, one process per GPU: the rank variables torchrun would have set, from
    the MPI launcher's, and the rendezvous address agreed over MPI (returned). UsageError for a partial or
    impossible MPI environment."""
    from qlaunch.cluster.mpi import agree_on_rank0, cpu_threads, given_endpoint, mpi_rank_env

    added, problem = mpi_rank_env(os.environ)
    if problem:
        raise UsageError(problem)
    if not added:
        return {}
    endpoint = given_endpoint(os.environ)
    if endpoint is None and int(added["WORLD_SIZE"]) > 1:
        try:
            from qlaunch.cluster.rendezvous import free_port

            endpoint = agree_on_rank0(added, free_port)
        except ImportError:
            raise UsageError("started by mpirun without mpi4py, which agrees on rank 0's address: "
                             "pip install 'qlaunch[mpi]', or pass -x MASTER_ADDR=<rank 0's address> "
                             "-x MASTER_PORT=<a free port> to mpirun.") from None
    if endpoint is not None:
        added.update(MASTER_ADDR=endpoint[0], MASTER_PORT=str(endpoint[1]))
    os.environ.update(added)
    threads = cpu_threads(os.environ, int(added["LOCAL_WORLD_SIZE"]), os.cpu_count() or 1)
    if threads:
        import torch

        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    return added


def use_single_process_env() -> None:
    """DeepSpeed without a launcher: give this process the rank variables a launcher would."""
    from qlaunch.cluster.rendezvous import free_port, single_process_env

    added = single_process_env(os.environ, free_port())
    if added:
        os.environ.update(added)
        log.info("single process with DeepSpeed: %s", " ".join(f"{k}={v}" for k, v in added.items()))


def prepare(argv=None, machine=None, *, process_env: bool = False):
    """Arguments → checked, resolved Config. Raises UsageError listing every problem.

    process_env: this process is the run (finetune.py's main, not a test or a tool calling in):
    set the rank variables single-process DeepSpeed needs."""
    from qlaunch.config.arguments import build_config, parse_namespace
    from qlaunch.config.machine import Machine
    from qlaunch.config.resolve import resolve
    from qlaunch.config.validate import check_arguments

    namespace = parse_namespace(argv)
    settings = resolve(namespace, Machine.detect() if machine is None else machine)
    problems = check_arguments(namespace) + settings.problems
    if problems:
        raise UsageError(problems)
    if namespace.deepspeed and process_env:
        use_single_process_env()  # before TrainingArguments, which initialises DeepSpeed's comm
    return build_config(namespace, settings)


def is_zero3(training_args) -> bool:
    plugin = getattr(training_args, "hf_deepspeed_config", None)
    return bool(plugin and plugin.is_zero3())


def load_datasets(config, tokenizer):
    """Tokenize training (and evaluation) data once: the main process builds the cache, the others map it."""
    from qlaunch.config.files import resolve_cache_dir
    from qlaunch.data.dataset import build_dataset, build_on_main_first

    dargs, targs = config.data, config.training
    kwargs = dict(
        max_length=targs.model_max_length,
        system_message=dargs.system_message,
        truncation=dargs.truncation,
        lazy=dargs.lazy_preprocess,
        show_progress=targs.process_index == 0,
        cache_dir=resolve_cache_dir(dargs.cache_dir),
        verify_cache=targs.local_process_index == 0,  # the node's first process checks; the others trust it
    )

    def build():
        train = build_dataset(dargs.data_path, tokenizer, **kwargs)
        evaluation = build_dataset(dargs.eval_data_path, tokenizer, **kwargs) if dargs.eval_data_path else None
        if dargs.packing:  # planned here, so the first process stores the plan and the others read it
            from qlaunch.data.packing import pack

            train, evaluation = pack(train, targs.model_max_length), pack(evaluation, targs.model_max_length)
        return train, evaluation

    return build_on_main_first(targs, build)


def report_dry_run(config, train_dataset=None) -> None:
    import yaml

    from qlaunch.memory.fit import plan_text

    effective = {"quant_method": config.quant_method, "compute_dtype": str(config.compute_dtype)}
    effective.update(config.non_default())
    log.info("Effective configuration (non-default values):\n%s", yaml.safe_dump(effective, sort_keys=True))
    log.info("%s", plan_text(config, train_dataset))  # the same plan as python -m qlaunch.plan
    log.info("--dry_run: configuration and data are valid; exiting before loading the model.")


def load_model(config):
    """The base (full precision / NF4 / GPTQ) with LoRA attached; returns (model, LoRA targets)."""
    from transformers import set_seed

    from qlaunch.model.load import load_base_model
    from qlaunch.model.lora import attach_lora, upcast_trainables

    margs, largs, targs = config.model, config.lora, config.training
    # Seed before the model exists: LoRA's A matrices are drawn at attach time, before the Trainer seeds.
    set_seed(targs.seed)
    zero3 = is_zero3(targs)
    if zero3:
        # from_pretrained under ZeRO-3 builds deepspeed.zero.Init, which reads the world size from
        # DeepSpeed's comm layer: initialise it first, or it sees 1 process and rejects the batch size.
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo" if targs.use_cpu else None)
    settings = config.settings

    def load():
        model = load_base_model(
            margs, largs, config.quant_method, config.compute_dtype, use_cpu=targs.use_cpu,
            engine=settings.engine if settings else Engine(), load_dtype=settings.load_dtype if settings else None,
            experts_4bit=bool(settings and settings.quantize_experts),
        )
        if settings and settings.shard_gptq:  # before the skeleton is taken, so the packed weights travel as meta
            from qlaunch.model.gptq_shard import make_shardable

            log.info("GPTQ base: %d layers' packed weights stored as frozen %s parameters for %s to shard.",
                     make_shardable(model, config.compute_dtype), config.compute_dtype, settings.engine.label)
        return model

    if settings and settings.rank0_load:
        from qlaunch.model.rank0_load import load_on_rank0

        _ = targs.device  # accelerate's process group, which the skeleton is broadcast over
        model = load_on_rank0(load)
    else:
        model = load()
    targets = None
    if largs.use_lora:
        model = attach_lora(
            model, largs, quant_method=config.quant_method, gradient_checkpointing=targs.activation_checkpointing
        )
        targets = sorted(next(iter(model.peft_config.values())).target_modules)
        if settings and settings.shard_gptq:
            from qlaunch.model.gptq_shard import unalias_peft_layers

            unalias_peft_layers(model)
        if config.settings and config.settings.fp32_trainables:
            upcast = upcast_trainables(model)
            if upcast:
                log.info("Mixed precision: %d trainable 16-bit tensors (modules_to_save, biases) kept in float32, "
                         "so the optimizer updates float32 weights.", upcast)
    elif targs.activation_checkpointing:
        model.enable_input_require_grads()
    if settings and settings.zero3_init:
        from qlaunch.model.zero3_init import partition_for_zero3

        partition_for_zero3(model, targs.hf_deepspeed_config.config, targs.device)  # logs what it partitioned
    return model, targets


def describe_run(config, trainer, model, targets) -> dict:
    """run_info.json's content, with the facts also logged."""
    from qlaunch.model.lora import count_parameters
    from qlaunch.train.trainer import run_info

    trainable, total = count_parameters(model)
    note = " (packed GPTQ weights not counted)" if config.quant_method == "gptq" else ""
    log.info("Trainable parameters: %s of %s (%.3f%%)%s", f"{trainable:,}", f"{total:,}",
             100 * trainable / max(total, 1), note)
    info = run_info(config, trainer, trainable, total, targets)
    if config.quant_method in ("nf4", "fp4"):
        from qlaunch.model.footprint import quantized_storage, storage_text

        info["quantized_storage"] = storage = quantized_storage(model)
        log.info(storage_text(config.quant_method, storage))
    log.info("World size %d (%s), device %s", info["world_size"], info["distributed"], info["device"])
    return info


def verify_final_save(config, trainer, directory: str) -> str | None:
    """Read the saved adapter back from `directory` (main process); every rank learns the verdict. None if fine.
    Under ZeRO-3 and FSDP2 the adapter is gathered first (collective) and no probe forward is run
    (a forward is collective there, and the frozen base is sharded too)."""
    from qlaunch.train.callbacks import any_rank

    problems = []
    if config.lora.use_lora:
        from qlaunch.train.fsdp import full_adapter_state
        from qlaunch.train.verify import full_trainable_parameters, verify_saved_adapter

        zero3 = is_zero3(config.training)
        expected = full_adapter_state(trainer.model) if trainer.is_fsdp_enabled else None
        with full_trainable_parameters(trainer.model, zero3):
            if trainer.is_world_process_zero():
                problems = verify_saved_adapter(trainer.model, directory,
                                                compare_logits=not (zero3 or trainer.is_fsdp_enabled),
                                                expected=expected, compute_dtype=config.compute_dtype)
    if any_rank(bool(problems)):
        return ("the saved adapter does not match the trained model: " + " ".join(problems)
                if problems else "the saved adapter failed verification on the main process.")
    return None


def report_name(config) -> str:
    return f"{os.path.basename(config.model.model_name_or_path.rstrip('/'))} · {config.quant_method or 'full precision'}"


def save_results(config, trainer, result, info, train_dataset, eval_dataset, clock) -> str | None:
    """Save, verify and report; returns the verification failure, if any."""
    from qlaunch.train.checkpoints import publish_final, stage_final
    from qlaunch.train.metrics import run_metrics
    from qlaunch.train.report import write_report
    from qlaunch.train.trainer import save_json

    targs = config.training
    staged = stage_final(trainer, targs.output_dir)  # adapter only for LoRA (gathered under ZeRO-3), + tokenizer
    failure = verify_final_save(config, trainer, staged)
    if failure:
        if trainer.is_world_process_zero():
            log.error("The unverified result stays in %s for inspection; nothing loadable was published.", staged)
        return failure
    publish_final(trainer, staged, targs.output_dir)  # loadable only now: adapter_config.json lands last
    metrics = dict(result.metrics)
    run = run_metrics(config, trainer, clock)
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
    if trainer.is_world_process_zero():
        info["train_samples"] = len(train_dataset)
        save_json(os.path.join(targs.output_dir, "run_info.json"), info)
        write_report(targs.output_dir, metrics, trainer.state.log_history, report_name(config), run)
        log.info("Saved %s to %s (metrics.json, loss_curve.png, run_info.json)%s",
                 "adapter" if config.lora.use_lora else "model", targs.output_dir,
                 "; read back and verified" if config.lora.use_lora else "")
    return None


@dataclass
class Outcome:
    """How a run ended. status: done | dry_run | preempted | non_finite | verify_failed."""

    status: str
    trainer: Any = None
    message: str | None = None
    step: int | None = None  # the step training stopped at, for preempted / non_finite

    @property
    def exit_code(self) -> int:
        return 1 if self.status in ("non_finite", "verify_failed") else 0


def preempted_before_training(signals, targs, stage: str) -> Outcome | None:
    """A preemption signal that arrived before the first step (any rank): stop here, requeue, exit 0."""
    from qlaunch.train.callbacks import any_rank
    from qlaunch.train.trainer import requeue_if_slurm

    if not any_rank(signals.received is not None):
        return None
    message = (f"Stopped by {signals.received or 'a signal to another rank'} while {stage}, before training: "
               "nothing trained, nothing to checkpoint.")
    log.warning(message)
    requeue_if_slurm()
    return Outcome("preempted", None, message, 0)


def fit(config, extra_callbacks=(), signals: PreemptionSignals | None = None) -> Outcome:
    """Load, train, save and report. signals: the preemption record finetune.py started on its first line."""
    from qlaunch.model.load import load_tokenizer
    from qlaunch.train.callbacks import NonFiniteLossGuard, PreemptionCallback
    from qlaunch.train.metrics import RunClock
    from qlaunch.train.trainer import agreed_resume, build_trainer, requeue_if_slurm, resume_request, train_or_finish

    targs = config.training
    for note in config.notes:
        log.info(note)
    for warning in config.warnings:
        log.warning(warning)

    tokenizer = load_tokenizer(config.model.model_name_or_path, config.model.trust_remote_code)
    signals = signals or PreemptionSignals.install()
    train_dataset, eval_dataset = load_datasets(config, tokenizer)
    if targs.dry_run:
        report_dry_run(config, train_dataset)
        return Outcome("dry_run")
    early = preempted_before_training(signals, targs, "tokenizing")  # before a load that can take minutes
    if early:
        return early

    model, targets = load_model(config)
    rank0_weights = None
    if config.settings and config.settings.rank0_load and config.settings.rank0_scatter:
        from qlaunch.model.rank0_load import rank0_tensors

        rank0_weights = rank0_tensors(model)  # before fully_shard replaces them; scattered after it
    lead = config.settings.signal_lead if config.settings else None
    preemption, guard, clock = PreemptionCallback(signals, lead=lead), NonFiniteLossGuard(), RunClock()
    trainer = build_trainer(config, model, tokenizer, train_dataset, eval_dataset,
                            [preemption, guard, clock, *extra_callbacks], rank0_weights=rank0_weights)
    early = preempted_before_training(signals, targs, "loading the model")
    if early:
        return early
    info = describe_run(config, trainer, model, targets)
    resume = agreed_resume(resume_request(targs.resume_from_checkpoint, os.environ), targs.output_dir)
    result = train_or_finish(trainer, resume)

    if guard.bad_step is not None:
        log.error(guard.message())
        return Outcome("non_finite", trainer, guard.message(), guard.bad_step)
    if preemption.stopped:
        inside = (f" (inside step {preemption.stopped_at_step + 1}, after {preemption.mid_step[0]} of its "
                  f"{preemption.mid_step[1]} micro-steps, which were dropped: the warning's lead was shorter than "
                  "finishing the step and saving)") if preemption.mid_step else ""
        message = (f"Stopped by {preemption.reason()} at step {preemption.stopped_at_step}{inside}; "
                   f"checkpoint saved in {targs.output_dir}.")
        log.warning(message)
        if trainer.is_world_process_zero():  # the report so far, beside the checkpoint
            from qlaunch.train.metrics import run_metrics
            from qlaunch.train.report import write_report

            write_report(targs.output_dir, {"preempted_at_step": preemption.stopped_at_step},
                         trainer.state.log_history, report_name(config), run_metrics(config, trainer, clock))
        requeue_if_slurm()
        return Outcome("preempted", trainer, message, preemption.stopped_at_step)
    failure = save_results(config, trainer, result, info, train_dataset, eval_dataset, clock)
    if failure:
        log.error(failure)
        return Outcome("verify_failed", trainer, failure)
    return Outcome("done", trainer)


def run(config, extra_callbacks=(), signals: PreemptionSignals | None = None) -> int:
    """Exit code of a run: 0 done (or preempted and checkpointed), 1 non-finite loss or failed verification."""
    return fit(config, extra_callbacks, signals).exit_code


def rank_prog(env=os.environ) -> str:
    """finetune.py, with the rank when there are several: every rank's error names its rank."""
    world = int(env.get("WORLD_SIZE", "1"))
    return f"finetune.py (rank {env.get('RANK', '0')} of {world})" if world > 1 else "finetune.py"


def main(argv=None, extra_callbacks=()) -> None:
    """Exit codes: 0 done (or preempted and checkpointed), 1 non-finite loss or failed verification,
    2 bad input, 3 out of GPU memory.

    Problems found while validating are the same on every rank: local rank 0 prints them. An error
    during the run can be one rank's own (its node's disk, its GPU's memory): every rank prints it,
    named by its rank — otherwise torchrun shows only an exit code for ranks other than 0."""
    signals = PreemptionSignals.install()  # first: a SLURM warning during loading must not be lost
    import torch

    from qlaunch.memory import fit as memory_fit

    from_srun = use_srun_task_env()  # before anything reads the rank or the world size
    try:
        from_mpi = use_mpi_env()
        from qlaunch.config.environment import rank_variable_problems

        problems = rank_variable_problems(os.environ)  # read by torch and the ranks' logs
        if problems:
            raise UsageError(problems)
    except UsageError as e:
        print(e.render(), file=sys.stderr)
        sys.exit(2)
    setup_logging()
    if from_srun:
        log.info("srun task without a launcher: %s", " ".join(f"{k}={v}" for k, v in from_srun.items()))
    if from_mpi:
        log.info("MPI process without a launcher: %s", " ".join(f"{k}={v}" for k, v in from_mpi.items()))
    config = None
    local_zero = int(os.environ.get("LOCAL_RANK", "0")) == 0
    try:
        config = prepare(argv, process_env=True)
        code = run(config, extra_callbacks, signals)
    except UsageError as e:
        if config is not None:
            print(e.render(rank_prog()), file=sys.stderr)
        elif local_zero:
            print(e.render(), file=sys.stderr)
        sys.exit(2)
    except torch.OutOfMemoryError as e:
        if local_zero:
            print(memory_fit.oom_report(config, e, memory_fit.device_memory()), file=sys.stderr)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            print(f"{rank_prog()}: error: out of GPU memory ({str(e).splitlines()[0][:160]})", file=sys.stderr)
        sys.exit(memory_fit.EXIT_CODE)
    except Exception as e:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one line naming the rank, then the traceback
            print(f"{rank_prog()}: error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                  file=sys.stderr, flush=True)
        raise
    sys.exit(code)


if __name__ == "__main__":
    main()
