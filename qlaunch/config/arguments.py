"""Arguments: dataclasses, the parser, YAML recipes and validation.

Field names are Qwen finetune.py's (``model_name_or_path``, ``data_path``, ``use_lora``,
``q_lora``, ``lora_r`` …) plus every Hugging Face ``TrainingArguments`` flag. A YAML recipe
(``--config``) uses exactly the same keys; anything given on the command line wins.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import transformers
import yaml

from qlaunch.config.errors import UsageError


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local directory of the base model (required)."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run Python code shipped with the checkpoint (needed by e.g. Qwen-7B). Off unless given."},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "eager | sdpa | flash_attention_2 (default: transformers' choice)."}
    )


@dataclass
class DataArguments:
    data_path: str | None = field(
        default=None, metadata={"help": "Training data: .json (a list) or .jsonl; Qwen, OpenAI or alpaca records."}
    )
    eval_data_path: str | None = field(default=None, metadata={"help": "Evaluation data, same formats."})
    lazy_preprocess: bool = field(
        default=False, metadata={"help": "Tokenize each sample when used instead of all up front (never "
                                  "cached; a .jsonl file is read from disk, so it may be larger than memory)."}
    )
    system_message: str = field(
        default="You are a helpful assistant.",
        metadata={"help": "System prompt for samples that carry none ('' for none)."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pack samples into rows of up to model_max_length tokens, isolated from each other "
                  "(positions restart per sample, no attention across samples): far less padding."},
    )
    truncation: str = field(
        default="truncate",
        metadata={"help": "Samples longer than model_max_length: 'truncate' (default) or 'drop'."},
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Tokenized-data cache (Arrow, built once, memory-mapped by every rank); default "
                  "$HF_HOME/qlaunch/tokenized; 'none' tokenizes in memory every run. Not used with "
                  "--lazy_preprocess."},
    )


@dataclass
class LoraArguments:
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters on a frozen base."})
    q_lora: bool = field(default=False, metadata={"help": "Q-LoRA: LoRA on a 4-bit quantized base (implies use_lora)."})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names to adapt, as a list or one comma string "
            "(default: every linear projection of the decoder blocks, detected from the model).",
            "nargs": "+",
        },
    )
    lora_target_parameters: list[str] | None = field(
        default=None,
        metadata={
            "help": "Parameters to adapt directly (peft's target_parameters), e.g. mlp.experts.gate_up_proj "
            "mlp.experts.down_proj for the fused experts of an MoE base (Qwen3-MoE, Mixtral); default none.",
            "nargs": "+",
        },
    )
    lora_weight_path: str | None = field(
        default=None, metadata={"help": "An existing adapter directory to continue training from."}
    )
    lora_bias: str = field(default="none", metadata={"help": "none | all | lora_only."})
    use_dora: bool = field(
        default=False, metadata={"help": "DoRA (peft): a trained magnitude per output beside the LoRA direction. "
                                 "Not with GPTQ bases (peft has no DoRA for them)."}
    )
    use_rslora: bool = field(
        default=False, metadata={"help": "rsLoRA (peft): scale by lora_alpha / sqrt(r) instead of lora_alpha / r."}
    )
    init_lora_weights: str = field(
        default="true", metadata={"help": "true (B = 0, peft's default) | gaussian | false (random B: for tests) | "
                                  "loftq (NF4/FP4 Q-LoRA: A, B from the SVD of each layer's 4-bit error)."}
    )
    loraplus_lr_ratio: float | None = field(
        default=None, metadata={"help": "LoRA+: learning rate of the B matrices = this x --learning_rate (e.g. 16; "
                                "peft's create_loraplus_optimizer). Unset: plain LoRA."}
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Extra modules trained in full and saved with the adapter, e.g. embed_tokens lm_head.",
            "nargs": "+",
        },
    )
    quantization: str = field(
        default="auto",
        metadata={"help": "With --q_lora: auto (the checkpoint's own GPTQ config, else nf4) | nf4 | fp4 | gptq."},
    )
    bnb_4bit_use_double_quant: bool = field(
        default=True, metadata={"help": "NF4/FP4: quantize the quantization constants too (QLoRA paper)."}
    )
    bnb_4bit_quant_storage: str | None = field(
        default=None,
        metadata={"help": "NF4/FP4 storage dtype (e.g. bfloat16 for ZeRO-3 / FSDP sharding; default uint8)."},
    )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = field(
        default=8192, metadata={"help": "Maximum sequence length; longer samples are truncated or dropped."}
    )
    config: str | None = field(
        default=None, metadata={"help": "YAML recipe with the same keys as these flags; the command line wins."}
    )
    precision: str = field(
        default="auto",
        metadata={"help": "auto (bf16 on GPUs of compute capability >= 8.0, fp16 below and for GPTQ, float32 on "
                  "CPU) | bf16 | fp16 | fp32. --bf16 True / --fp16 True also choose."},
    )
    # transformers' default (True) replaces NaN/inf losses with the running average in the logs,
    # which hides a diverging run; qlaunch logs them and stops (see callbacks.NonFiniteLossGuard).
    logging_nan_inf_filter: bool = field(
        default=False, metadata={"help": "Hide NaN/inf losses from the logs (transformers' default: True)."}
    )
    dry_run: bool = field(
        default=False,
        metadata={"help": "Print the effective configuration and data statistics, then exit without training."},
    )
    labelled_logits_only: bool = field(
        default=True,
        metadata={"help": "Run lm_head and the loss only at positions that have a label (assistant tokens): "
                  "same loss and gradients, logits memory scales with trained tokens. False: every position "
                  "(transformers' path; also used automatically by models that cannot, e.g. remote code)."},
    )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, LoraArguments, TrainingArguments)

# Flags that older scripts (Qwen's among them) pass under names transformers has since renamed.
LEGACY_ALIASES = {"evaluation_strategy": "eval_strategy"}


@dataclass
class Config:
    model: ModelArguments
    data: DataArguments
    lora: LoraArguments
    training: TrainingArguments
    # Derived from flags, the checkpoint and the machine (qlaunch.resolve).
    settings: Any = None

    @property
    def quant_method(self) -> str | None:
        return self.settings.quant_method if self.settings else None

    @property
    def compute_dtype(self):
        return self.settings.compute_dtype if self.settings else None

    @property
    def notes(self) -> list[str]:
        return self.settings.notes if self.settings else []

    @property
    def warnings(self) -> list[str]:
        return self.settings.warnings if self.settings else []

    def non_default(self) -> dict[str, Any]:
        """The settings that differ from the defaults: what this run actually chose."""
        out: dict[str, Any] = {}
        for part in (self.model, self.data, self.lora, self.training):
            for f in dataclasses.fields(part):
                if not f.init or f.name in ("logging_dir", "accelerator_config"):
                    continue
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                value = getattr(part, f.name)
                plain = getattr(value, "value", value)
                if plain == getattr(default, "value", default) or plain in ([], {}):
                    continue
                simple = isinstance(plain, (str, int, float, bool, list, dict, type(None)))
                out[f.name] = copy.deepcopy(plain) if simple else str(plain)
        return out


CHECKED_CHOICES = ("optim", "lr_scheduler_type", "save_strategy", "eval_strategy", "logging_strategy")


class _Parser(transformers.HfArgumentParser):
    def error(self, message):
        # argparse would print the whole usage (hundreds of flags) before its message: one line instead.
        raise UsageError(f"{message}. See `python finetune.py --help`.")


def make_parser() -> transformers.HfArgumentParser:
    parser = _Parser(
        ARGUMENT_CLASSES,
        prog="finetune.py",
        description="Fine-tune a causal LM with LoRA or Q-LoRA (NF4 / GPTQ Int4). "
        "Flags and data format are compatible with Qwen's finetune.py.",
        allow_abbrev=False,
    )
    for action in parser._actions:
        if action.dest in CHECKED_CHOICES:
            # validate_args checks these with every other problem; argparse would stop at the first.
            action.choices = None
    for old, new in LEGACY_ALIASES.items():
        parser.add_argument(f"--{old}", dest=new, help=argparse.SUPPRESS)
    # transformers 5 renamed --group_by_length to --train_sampling_strategy group_by_length.
    parser.add_argument("--group_by_length", type=transformers.hf_argparser.string_to_bool, nargs="?", const=True,
                        default=False, help=argparse.SUPPRESS)
    # transformers 5 folded warmup_ratio into warmup_steps (a value below 1 is a ratio).
    parser.add_argument("--warmup_ratio", type=float, default=None, help=argparse.SUPPRESS)
    return parser


def _dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.dest != "help"}


def load_yaml_recipe(path: str) -> dict[str, Any]:
    from qlaunch.config.files import config_file_problems

    if not os.path.isfile(path):
        raise UsageError(config_file_problems(path, None))
    with open(path, encoding="utf-8") as f:
        try:
            values = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise UsageError(f"--config {path}: not valid YAML: {e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values, got {type(values).__name__}.")
    return {LEGACY_ALIASES.get(k, k): v for k, v in values.items()}


def _split_comma_lists(namespace: argparse.Namespace) -> None:
    """Accept `--lora_target_modules q_proj,v_proj` and YAML strings as well as lists."""
    for name in ("lora_target_modules", "lora_modules_to_save", "lora_target_parameters"):
        value = getattr(namespace, name, None)
        if value is None:
            continue
        items = [value] if isinstance(value, str) else list(value)
        flat = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
        setattr(namespace, name, flat or None)


def parse_namespace(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse YAML (if any) and the command line into one namespace; unknown keys are an error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    known = _dests(parser)

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre_ns, _ = pre.parse_known_args(argv)
    problems = []
    if pre_ns.config:
        recipe = load_yaml_recipe(pre_ns.config)
        unknown = sorted(set(recipe) - known)
        if unknown:
            problems.append(
                f"--config {pre_ns.config}: unknown keys {', '.join(unknown)}. "
                "Recipe keys are finetune.py flag names (see `python finetune.py --help`)."
            )
        parser.set_defaults(**{k: v for k, v in recipe.items() if k in known})

    namespace, remaining = parser.parse_known_args(argv)
    if remaining:
        flags = [r for r in remaining if r.startswith("-")] or remaining
        problems.append(
            f"unknown arguments: {' '.join(flags)}. See `python finetune.py --help` for the accepted flags."
        )
    if problems:
        raise UsageError(problems)
    _split_comma_lists(namespace)
    if isinstance(namespace.init_lora_weights, bool):  # a YAML true / false
        namespace.init_lora_weights = str(namespace.init_lora_weights).lower()
    if namespace.group_by_length:
        namespace.train_sampling_strategy = "group_by_length"
    return namespace


def build_config(namespace: argparse.Namespace, settings=None) -> Config:
    """The argument dataclasses, with the resolved settings' overrides applied."""
    values = {**vars(namespace), **(settings.overrides() if settings else {})}
    parts = []
    for cls in ARGUMENT_CLASSES:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {k: v for k, v in values.items() if k in names}
        try:
            parts.append(cls(**kwargs))
        except ValueError as e:  # TrainingArguments.__post_init__ checks combinations itself
            raise UsageError(f"training arguments: {e}") from None
    return Config(*parts, settings=settings)
