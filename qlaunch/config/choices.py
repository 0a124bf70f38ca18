"""The fixed value sets of finetune.py's own string flags (transformers' enums check the rest),
shared by the checks (validate) and the derived settings (resolve)."""
from __future__ import annotations

from qlaunch.config.precision import PRECISIONS

CHOICES = {
    "truncation": ("truncate", "drop"),
    "quantization": ("auto", "nf4", "fp4", "gptq"),
    "lora_bias": ("none", "all", "lora_only"),
    "init_lora_weights": ("true", "false", "gaussian", "loftq"),
    "precision": PRECISIONS,
}
