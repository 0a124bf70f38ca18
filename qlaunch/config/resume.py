"""--resume_from_checkpoint, checked from the checkpoint's metadata before anything loads.

Without this a missing or garbage checkpoint, or one whose adapter has another LoRA rank, was a traceback
after the model had loaded (minutes for a large base). What makes a checkpoint complete is defined here
once; qlaunch.train.checkpoints stages and commits checkpoints by the same rule.
"""
from __future__ import annotations

import json
import os
import re

AUTO = ("auto", "true", "last")  # --resume_from_checkpoint values that mean "the newest in --output_dir"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# A checkpoint is complete when it has the Trainer state (written last) and the model or adapter.
REQUIRED = ("trainer_state.json",)
WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "adapter_model.bin", "pytorch_model.bin",
           "model.safetensors.index.json")


def is_complete(path: str) -> bool:
    names = set(os.listdir(path)) if os.path.isdir(path) else set()
    return all(r in names for r in REQUIRED) and any(w in names for w in WEIGHTS)


def requested(value) -> str | None:
    """The checkpoint a --resume_from_checkpoint value names: None (no resume), "auto", or a path."""
    if value in (None, "", False) or str(value).lower() in ("false", "none"):
        return None
    return "auto" if str(value).lower() in AUTO else str(value)


def numbered_checkpoints(output_dir: str) -> list[str]:
    """The checkpoint-N directories in output_dir, newest (highest N) first."""
    numbered = sorted(((int(m.group(1)), name) for name in os.listdir(output_dir)
                       if (m := CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))),
                      reverse=True)
    return [os.path.join(output_dir, name) for _, name in numbered]


def newest_checkpoint(output_dir: str | None) -> str | None:
    """The newest complete checkpoint-N in output_dir (what `auto` resumes from), without side effects."""
    if not output_dir or not os.path.isdir(output_dir):
        return None
    return next((path for path in numbered_checkpoints(output_dir) if is_complete(path)), None)


def checkpoint_problems(path: str, flag: str, lora_r: int | None) -> list[str]:
    """What would make resuming from `path` fail after loading: not a complete checkpoint, a trainer state
    that is not a Trainer state, an adapter of another rank than this run's."""
    if not os.path.isdir(path):
        return [f"{flag}: not a directory; pass a checkpoint-N directory of an earlier run, or auto (the newest "
                "in --output_dir)."]
    if not is_complete(path):
        return [f"{flag}: not a complete checkpoint (it needs {' and '.join(REQUIRED)} and the adapter or model "
                "weights); pass another checkpoint-N, or auto (the newest complete one)."]
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError):
        state = None
    step = state.get("global_step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return [f"{flag}: trainer_state.json is not a Trainer state (no global_step); the checkpoint is damaged, "
                "pass another one."]
    adapter = os.path.join(path, "adapter_config.json")
    if lora_r is not None and os.path.isfile(adapter):
        try:
            with open(adapter, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError):
            return [f"{flag}: adapter_config.json does not parse; the checkpoint is damaged, pass another one."]
        rank = saved.get("r") if isinstance(saved, dict) else None
        if isinstance(rank, int) and rank != lora_r:
            return [f"{flag}: its adapter has r={rank}, this run asks --lora_r {lora_r}; resume with the same "
                    "LoRA settings, or start a new --output_dir."]
    return []


def resume_problems(value, output_dir: str | None, lora_r: int | None) -> list[str]:
    """--resume_from_checkpoint PATH checked as given; `auto` checks the checkpoint it would pick."""
    wanted = requested(value)
    if wanted is None:
        return []
    if wanted == "auto":
        newest = newest_checkpoint(output_dir)
        flag = f"--resume_from_checkpoint auto (picks {newest!r})"
        return checkpoint_problems(newest, flag, lora_r) if newest else []
    return checkpoint_problems(os.path.expanduser(wanted), f"--resume_from_checkpoint {wanted!r}", lora_r)
