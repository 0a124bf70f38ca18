"""Checks of input files that need no heavy imports (shared by finetune.py and the launcher)."""
from __future__ import annotations

import os


def config_file_problems(config: str | None, deepspeed) -> list[str]:
    """--config and --deepspeed files that do not exist."""
    problems = []
    if config and not os.path.isfile(config):
        problems.append(f"--config: no such file: {config!r}. Pass the path of a YAML recipe (see recipes/).")
    if deepspeed and isinstance(deepspeed, str) and not deepspeed.lstrip().startswith("{"):
        if not os.path.isfile(deepspeed):
            problems.append(f"--deepspeed: no such file: {deepspeed!r}. Pass a DeepSpeed JSON (see ds_configs/).")
    return problems
