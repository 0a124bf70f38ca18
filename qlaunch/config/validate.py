"""validate_args: every problem with the arguments, collected and reported at once.

The checks here are pure: they read the parsed arguments and return problems. What qlaunch
derives from the arguments, the checkpoint and the machine lives in resolve.py; validate_args
adds the problems found while deriving, so one call reports everything.
"""
from __future__ import annotations

import argparse
import json
import os

from qlaunch.config.choices import CHOICES
from qlaunch.config.domains import FINETUNE, domain_problems
from qlaunch.config.files import config_file_problems, file_problem, overlap_problems
from qlaunch.config.machine import Machine
from qlaunch.config.resume import resume_problems


def _check_paths(ns: argparse.Namespace, problems: list[str]) -> None:
    if not ns.model_name_or_path:
        problems.append("--model_name_or_path is required: a local model directory or a hub id.")
    elif ns.model_name_or_path.startswith((".", "/", "~")) and not os.path.isdir(
        os.path.expanduser(ns.model_name_or_path)
    ):
        problems.append(f"--model_name_or_path: directory not found: {ns.model_name_or_path!r}.")
    if not ns.data_path:
        problems.append("--data_path is required: a .json or .jsonl file of training samples.")
    for flag in ("data_path", "eval_data_path"):
        path = getattr(ns, flag)
        if not path:
            continue
        unreadable = file_problem(path)
        if unreadable:
            problems.append(f"--{flag}: {unreadable} Pass a .json or .jsonl file.")
        elif not path.endswith((".json", ".jsonl")):
            problems.append(f"--{flag}: {path!r} must end in .json (a list of records) or .jsonl (one per line).")
    if ns.lora_weight_path and not os.path.isfile(os.path.join(ns.lora_weight_path, "adapter_config.json")):
        problems.append(
            f"--lora_weight_path: no adapter_config.json in {ns.lora_weight_path!r}; "
            "pass a directory written by a LoRA run (its --output_dir)."
        )
    problems.extend(config_file_problems(ns.config, ns.deepspeed, ns.fsdp_config))
    problems.extend(resume_problems(getattr(ns, "resume_from_checkpoint", None), ns.output_dir,
                                    ns.lora_r if (ns.use_lora or ns.q_lora) else None))


# peft initialisations that change the base weights (PiSSA, OLoRA) or need data (CorDA, EVA). LoftQ is
# qlaunch's own (qlaunch.model.loftq): it keeps the 4-bit base as it is.
REWRITING_INITS = ("pissa", "olora", "corda", "eva")


def _check_values(ns: argparse.Namespace, problems: list[str]) -> None:
    init = str(getattr(ns, "init_lora_weights", "true")).lower()
    for name, allowed in CHOICES.items():
        if name == "init_lora_weights" and init.startswith(REWRITING_INITS):
            problems.append(f"--init_lora_weights {init}: not supported yet — it rewrites the base weights (or needs "
                            "calibration data), and the saved adapter would need converting to load on the original "
                            "base; use true or gaussian.")
        elif getattr(ns, name) not in allowed:
            problems.append(f"--{name} {getattr(ns, name)!r}: choose one of {', '.join(allowed)}.")
    problems.extend(domain_problems(ns, FINETUNE))  # every numeric flag: type, finite, range
    if ns.packing and ns.lazy_preprocess:
        problems.append("--packing needs every sample's length up front: remove --lazy_preprocess.")
    if ns.packing and _value(getattr(ns, "train_sampling_strategy", None)) == "group_by_length":
        problems.append("--packing and --group_by_length: packed rows are all about model_max_length long; "
                        "choose one.")
    if ns.lazy_preprocess and ns.truncation == "drop":
        problems.append(
            "--truncation drop needs every sample tokenized up front: remove --lazy_preprocess "
            "(or use --truncation truncate)."
        )
    if not (ns.use_lora or ns.q_lora):
        for flag in ("lora_weight_path", "lora_modules_to_save", "lora_target_modules", "lora_target_parameters",
                     "use_dora", "use_rslora",
                     "loraplus_lr_ratio"):
            if getattr(ns, flag, None):
                problems.append(f"--{flag} has no effect without --use_lora (or --q_lora).")
    if getattr(ns, "lora_target_parameters", None) and ns.lora_dropout:
        problems.append(f"--lora_target_parameters with --lora_dropout {ns.lora_dropout}: peft's LoRA on parameters "
                        "(ParamWrapper) has no dropout; pass --lora_dropout 0.")
    if ns.quantization != "auto" and not ns.q_lora:
        problems.append(f"--quantization {ns.quantization} has no effect without --q_lora.")
    from qlaunch.config.files import cache_dir_problem

    cache_problem = None if ns.lazy_preprocess else cache_dir_problem(getattr(ns, "cache_dir", None))
    if cache_problem:
        problems.append(cache_problem)


def _value(x):
    return getattr(x, "value", x)  # transformers' enums → their string


def _check_training(ns: argparse.Namespace, problems: list[str]) -> None:
    """The Trainer's numbers and choices, checked before anything loads (torch would only
    complain after the model is loaded: a negative learning rate in the optimizer, batch size 0
    in the sampler)."""
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType
    from transformers.training_args import OptimizerNames

    # The ranges of the numbers are declared in qlaunch.config.domains; here what relates two of them.
    if ns.max_steps == 0:
        problems.append(f"--max_steps {ns.max_steps}: pass a positive number of steps, or -1 to train "
                        "--num_train_epochs epochs.")
    epochs_ok = FINETUNE["num_train_epochs"].contains(ns.num_train_epochs)
    if FINETUNE["max_steps"].contains(ns.max_steps) and ns.max_steps <= 0 and epochs_ok and ns.num_train_epochs <= 0:
        problems.append(f"--num_train_epochs {ns.num_train_epochs}: nothing to train; pass a positive number "
                        "(or --max_steps N).")
    choices = {
        "optim": [o.value for o in OptimizerNames],
        "lr_scheduler_type": [t.value for t in SchedulerType],
        "save_strategy": [t.value for t in SaveStrategy],
        "eval_strategy": [t.value for t in IntervalStrategy],
        "logging_strategy": [t.value for t in IntervalStrategy],
    }
    for flag, allowed in choices.items():
        value = _value(getattr(ns, flag))
        if value not in allowed:
            shown = ", ".join(allowed[:12]) + (", …" if len(allowed) > 12 else "")
            problems.append(f"--{flag} {value!r}: choose one of {shown}.")
    if _value(ns.eval_strategy) not in ("no", None) and not ns.eval_data_path:
        problems.append(f"--eval_strategy {_value(ns.eval_strategy)} needs --eval_data_path (a held-out data file).")
    problems.extend(report_to_problems(ns.report_to))


def report_to_problems(report_to) -> list[str]:
    """Unknown or not-installed --report_to targets (the Trainer fails late, or silently skips)."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    targets = [report_to] if isinstance(report_to, str) else list(report_to or [])
    targets = [t for part in targets for t in str(part).split(",") if t.strip()]
    problems = []
    for target in targets:
        target = target.strip()
        if target in ("none", "all"):
            continue
        if target not in INTEGRATION_TO_CALLBACK:
            problems.append(f"--report_to {target!r}: unknown; choose none, all or one of "
                            f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}.")
        elif target not in get_available_reporting_integrations():
            problems.append(f"--report_to {target}: not installed (pip install {target}), or use --report_to none.")
    return problems


def _check_output_dir(ns: argparse.Namespace, problems: list[str]) -> None:
    """--output_dir must be creatable and writable now, not after an hour of training."""
    out = ns.output_dir
    if not out:
        return
    path = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(path) and not os.path.isdir(path):
        problems.append(f"--output_dir {out!r}: exists and is not a directory; pass a directory.")
        return
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        problems.append(f"--output_dir {out!r}: cannot be created ({parent!r} is a file); pass another directory.")
    elif not os.access(parent, os.W_OK | os.X_OK):
        problems.append(f"--output_dir {out!r}: {parent!r} is not writable; pass a directory you can write to.")
    # Checkpoints to resume from live in --output_dir by design: --resume_from_checkpoint is not an input here.
    inputs = {f"--{flag}": getattr(ns, flag, None) for flag in (
        "model_name_or_path", "data_path", "eval_data_path", "lora_weight_path", "config", "deepspeed", "fsdp_config")}
    problems.extend(overlap_problems({"--output_dir": out}, inputs))


WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _check_model_dir(ns: argparse.Namespace, problems: list[str]) -> None:
    """A local model directory needs a config.json and weights (unless only planning: --dry_run)."""
    path = ns.model_name_or_path
    if not path or not os.path.isdir(os.path.expanduser(path)):
        return
    path = os.path.expanduser(path)
    if not os.access(path, os.R_OK | os.X_OK):
        problems.append(f"--model_name_or_path {path!r}: directory not readable; check its permissions.")
        return
    names = os.listdir(path)
    config = _json_object(os.path.join(path, "config.json")) if "config.json" in names else None
    if "config.json" not in names:
        problems.append(f"--model_name_or_path {path!r}: no config.json; pass a directory saved by "
                        "save_pretrained (or a hub id).")
    elif not ns.dry_run and not any(n.endswith(WEIGHT_FILES) for n in names):
        problems.append(f"--model_name_or_path {path!r}: no weights (*.safetensors / *.bin) beside config.json; "
                        "download the full checkpoint.")
    else:
        problems += _weights_problems(ns, path, config)
    if config is not None and not ns.dry_run:  # planning reads config.json itself (Qwen(1) keys too)
        problems += _config_problems(path, config)
    if ns.data_path and not any(n in TOKENIZER_FILES for n in names):  # the data is tokenized before loading
        problems.append(f"--model_name_or_path {path!r}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                        "copy the tokenizer of the base model into it (tokenizer.save_pretrained).")


# What AutoTokenizer can build a tokenizer from (fast, sentencepiece, BPE vocab, Qwen(1)'s tiktoken file)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "spiece.model", "qwen.tiktoken")


def _json_object(file: str) -> dict | None:
    """A JSON file's object, or None when it is unreadable or not an object (read_config reports that)."""
    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _config_problems(path: str, config: dict) -> list[str]:
    """config.json names a model_type the installed transformers knows (or ships its own code: auto_map),
    checked before anything loads."""
    if "auto_map" in config:  # remote code brings its own classes (--trust_remote_code is checked elsewhere)
        return []
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        return [f"--model_name_or_path {path!r}: config.json names no model_type; download it again."]
    if model_type not in CONFIG_MAPPING:
        return [f"--model_name_or_path {path!r}: model_type {model_type!r} is unknown to transformers "
                f"{transformers.__version__}; upgrade transformers (pip install -U transformers) or check the path."]
    return []


def _weights_problems(ns: argparse.Namespace, path: str, config: dict | None) -> list[str]:
    """The weight files' headers, and the modules the LoRA flags name, checked against the tensors the
    checkpoint holds (qlaunch.config.weights) — before anything loads."""
    from qlaunch.config.weights import checkpoint_tensor_names, unmatched_modules

    names, problems = checkpoint_tensor_names(path)
    problems = [f"--model_name_or_path {path!r}: {p}" for p in problems]
    if names is None:
        return problems
    tied = bool(config.get("tie_word_embeddings", True)) if config is not None else False
    examples = ", ".join(sorted({n.rsplit(".", 2)[-2] for n in names if n.count(".") >= 2})[:8])
    for flag in ("lora_target_modules", "lora_modules_to_save"):
        missing = unmatched_modules(getattr(ns, flag, None), names, tied_lm_head=tied)
        if missing:
            problems.append(f"--{flag} {' '.join(missing)}: no module of that name in {path!r} (its modules end in "
                            f"e.g. {examples}); use the model's own module names.")
    return problems


def check_arguments(ns: argparse.Namespace) -> list[str]:
    """Problems with the arguments themselves (no checkpoint, no machine)."""
    problems: list[str] = []
    _check_paths(ns, problems)
    _check_model_dir(ns, problems)
    _check_output_dir(ns, problems)
    _check_values(ns, problems)
    _check_training(ns, problems)
    return problems


def validate_args(ns: argparse.Namespace, *, machine: Machine | None = None) -> list[str]:
    """Every problem at once: the argument checks, then those found while resolving settings."""
    from qlaunch.config.resolve import resolve

    machine = Machine.detect() if machine is None else machine
    return check_arguments(ns) + resolve(ns, machine).problems
