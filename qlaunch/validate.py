"""validate_args: every problem with the arguments, collected and reported at once.

The checks here are pure: they read the parsed arguments and return problems. What qlaunch
derives from the arguments, the checkpoint and the machine lives in resolve.py; validate_args
adds the problems found while deriving, so one call reports everything.
"""
from __future__ import annotations

import argparse
import os

from qlaunch.files import config_file_problems
from qlaunch.machine import Machine
from qlaunch.precision import PRECISIONS

CHOICES = {
    "truncation": ("truncate", "drop"),
    "quantization": ("auto", "nf4", "fp4", "gptq"),
    "lora_bias": ("none", "all", "lora_only"),
    "precision": PRECISIONS,
}


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
        if path and not os.path.isfile(path):
            problems.append(f"--{flag}: file not found: {path!r}. Pass a .json or .jsonl file.")
        elif path and not path.endswith((".json", ".jsonl")):
            problems.append(f"--{flag}: {path!r} must end in .json (a list of records) or .jsonl (one per line).")
    if ns.lora_weight_path and not os.path.isfile(os.path.join(ns.lora_weight_path, "adapter_config.json")):
        problems.append(
            f"--lora_weight_path: no adapter_config.json in {ns.lora_weight_path!r}; "
            "pass a directory written by a LoRA run (its --output_dir)."
        )
    problems.extend(config_file_problems(ns.config, ns.deepspeed))


def _check_values(ns: argparse.Namespace, problems: list[str]) -> None:
    for name, allowed in CHOICES.items():
        if getattr(ns, name) not in allowed:
            problems.append(f"--{name} {getattr(ns, name)!r}: choose one of {', '.join(allowed)}.")
    if ns.lora_r < 1:
        problems.append(f"--lora_r {ns.lora_r}: the LoRA rank must be at least 1.")
    if ns.lora_alpha <= 0:
        problems.append(f"--lora_alpha {ns.lora_alpha}: must be positive.")
    if not 0 <= ns.lora_dropout < 1:
        problems.append(f"--lora_dropout {ns.lora_dropout}: must be in [0, 1).")
    if ns.model_max_length < 8:
        problems.append(f"--model_max_length {ns.model_max_length}: must be at least 8 tokens.")
    if ns.warmup_ratio is not None:
        if not 0 <= ns.warmup_ratio < 1:
            problems.append(f"--warmup_ratio {ns.warmup_ratio}: must be in [0, 1); use --warmup_steps N for steps.")
    if ns.lazy_preprocess and ns.truncation == "drop":
        problems.append(
            "--truncation drop needs every sample tokenized up front: remove --lazy_preprocess "
            "(or use --truncation truncate)."
        )
    if not (ns.use_lora or ns.q_lora):
        for flag in ("lora_weight_path", "lora_modules_to_save", "lora_target_modules"):
            if getattr(ns, flag):
                problems.append(f"--{flag} has no effect without --use_lora (or --q_lora).")
    if ns.quantization != "auto" and not ns.q_lora:
        problems.append(f"--quantization {ns.quantization} has no effect without --q_lora.")


def check_arguments(ns: argparse.Namespace) -> list[str]:
    """Problems with the arguments themselves (no checkpoint, no machine)."""
    problems: list[str] = []
    _check_paths(ns, problems)
    _check_values(ns, problems)
    return problems


def validate_args(ns: argparse.Namespace, *, machine: Machine | None = None) -> list[str]:
    """Every problem at once: the argument checks, then those found while resolving settings."""
    from qlaunch.resolve import resolve

    machine = Machine.detect() if machine is None else machine
    return check_arguments(ns) + resolve(ns, machine).problems
