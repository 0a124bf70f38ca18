"""The domain of every numeric flag, declared once; one checker enforces it for the command line and recipes.

A value is checked for its type (an integer flag takes an integer; a YAML `true` or `[8]` is not a
number), for being finite (NaN and ±inf pass every comparison-based check written as `x < 0`) and for
its range. Recipe values reach the namespace without argparse's conversion when they are not strings,
so the declaration is what catches them. Relations between flags (max_steps with num_train_epochs) and
with the model stay in validate.py / resolve.py.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

from qlaunch.config.errors import UsageError


@dataclass(frozen=True)
class Domain:
    kind: type  # int or float
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself excluded
    high_open: bool = False
    optional: bool = False  # None (unset) allowed
    says: str | None = None  # what to say when below the range, instead of the generated text
    hint: str = ""  # e.g. a typical value

    def contains(self, value) -> bool:
        return self.problem(value) is None

    def range_text(self, above: bool = False) -> str:
        if self.says and not above:
            return self.says
        low, high = _num(self.low), _num(self.high)
        if self.high is not None and self.low is not None:
            return f"must be in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low == 0:
            return "must be positive" if self.low_open else "must not be negative"
        if self.low is not None and not above:
            return f"must be greater than {low}" if self.low_open else f"must be at least {low}"
        if self.high is not None:
            return f"must be below {high}" if self.high_open else f"must be at most {high}"
        return "must be a finite number"

    def problem(self, value) -> str | None:
        """What is wrong with `value` (None if nothing)."""
        if value is None:
            return None if self.optional else "is required"
        suffix = f" ({self.hint})" if self.hint else ""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            kind = "an integer" if self.kind is int else "a number"
            return f"must be {kind}, not {type(value).__name__}{suffix}"
        if self.kind is int and not isinstance(value, int):
            return f"must be an integer{suffix}"
        if not math.isfinite(value):
            return f"must be a finite number{suffix}"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            return f"{self.range_text(above=above and not below)}{suffix}"
        return None


def _num(x) -> str:
    if x is None:
        return ""
    if x == 2**32:
        return "2**32"
    return str(int(x)) if float(x).is_integer() else str(x)


POSITIVE_STEPS = Domain(float, 0, low_open=True, optional=True, says="must be positive",
                        hint="a step count, or a fraction of the run below 1")
SEED = Domain(int, 0, 2**32, high_open=True, optional=True, hint="numpy's seed range")

# finetune.py (and python -m qlaunch.plan, which takes the same flags)
FINETUNE = {
    "lora_r": Domain(int, 1, says="the LoRA rank must be at least 1"),
    "lora_alpha": Domain(float, 0, low_open=True),
    "lora_dropout": Domain(float, 0, 1, high_open=True),
    "model_max_length": Domain(int, 8, says="must be at least 8 tokens"),
    "warmup_ratio": Domain(float, 0, 1, high_open=True, optional=True, hint="use --warmup_steps N for steps"),
    "warmup_steps": Domain(float, 0, says="must be at least 0"),
    "per_device_train_batch_size": Domain(int, 1),
    "per_device_eval_batch_size": Domain(int, 1),
    "gradient_accumulation_steps": Domain(int, 1),
    "learning_rate": Domain(float, 0, 10, says="must not be negative", hint="e.g. 2e-4 for LoRA"),
    "max_grad_norm": Domain(float, 0, says="must be at least 0"),
    "weight_decay": Domain(float, 0, 1, says="must be at least 0"),
    "dataloader_num_workers": Domain(int, 0, says="must be at least 0"),
    "adam_beta1": Domain(float, 0, 1, high_open=True, hint="e.g. 0.9"),
    "adam_beta2": Domain(float, 0, 1, high_open=True, hint="e.g. 0.95, 0.999"),
    "adam_epsilon": Domain(float, 0, 1, low_open=True, says="must be positive", hint="e.g. 1e-8"),
    "max_steps": Domain(int, -1, says="pass a positive number of steps, or -1 to train --num_train_epochs epochs"),
    "num_train_epochs": Domain(float, 0, says="must not be negative"),
    "logging_steps": POSITIVE_STEPS,
    "save_steps": POSITIVE_STEPS,
    "eval_steps": POSITIVE_STEPS,
    "seed": SEED,
    "data_seed": SEED,
    "save_total_limit": Domain(int, 1, optional=True, says="keep at least 1 checkpoint (or leave it unset)"),
    "loraplus_lr_ratio": Domain(float, 1, 1000, optional=True, hint="the LoRA+ paper uses 16; B learns faster than A"),
}


# the other commands' numeric flags
MERGE = {"probe_samples": Domain(int, 1, 100_000), "max_shard_gb": Domain(float, 0, low_open=True, hint="e.g. 5")}
QUANTIZE = {
    "num_samples": Domain(int, 1, says="at least 1 calibration sample is needed"),
    "model_max_length": Domain(int, 2, says="must be at least 2 tokens"),
    "seed": Domain(int, 0, 2**32, high_open=True, hint="numpy's seed range"),
}
CHAT = {"max_new_tokens": Domain(int, 1, 1_000_000), "temperature": Domain(float, 0, 100, hint="0 = greedy")}
EVALUATE = {"limit": Domain(int, 1, optional=True, hint="leave it unset for every sample"), "show": Domain(int, 0)}


class CommandParser(argparse.ArgumentParser):
    """argparse for qlaunch's commands: an error is one line and exit 2 (argparse would print the usage
    first), and the command's declared numeric domains are checked as soon as the flags are parsed,
    before anything loads (pass {} where the command reports them with its other problems: quantize)."""

    def __init__(self, name: str, domains: dict[str, Domain], **kwargs):
        super().__init__(prog=f"python -m {name}", **kwargs)
        self.name, self.domains = name, domains

    def error(self, message):
        print(f"{self.name}: error: {message}. See `{self.prog} --help`.", file=sys.stderr)
        sys.exit(2)

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        problems = domain_problems(parsed, self.domains)
        if problems:
            print(UsageError(problems).render(self.name), file=sys.stderr)
            sys.exit(2)
        return parsed


def domain_problems(values, domains: dict[str, Domain]) -> list[str]:
    """One problem per flag whose value is outside its declared domain (`values`: a namespace or dict)."""
    get = values.get if isinstance(values, dict) else (lambda name, default=None: getattr(values, name, default))
    problems = []
    for flag, domain in domains.items():
        value = get(flag, None)
        problem = domain.problem(value)
        if problem:
            problems.append(f"--{flag} {value!r}: {problem}.")
    return problems
