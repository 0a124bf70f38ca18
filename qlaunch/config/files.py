"""Checks of input files that need no heavy imports (shared by finetune.py and the launcher)."""
from __future__ import annotations

import json
import os


def file_problem(path: str) -> str | None:
    """Why `path` cannot be read as a file (missing, a directory, unreadable), or None."""
    if os.path.isdir(path):
        return f"{path!r} is a directory, not a file."
    if not os.path.exists(path):
        return f"file not found: {path!r}."
    if not os.access(path, os.R_OK):
        return f"{path!r} is not readable (permissions)."
    return None


def config_file_problems(config: str | None, deepspeed) -> list[str]:
    """--config and --deepspeed files that cannot be read; a DeepSpeed JSON that does not parse."""
    problems = []
    if config and file_problem(config):
        problems.append(f"--config: {file_problem(config)} Pass the path of a YAML recipe (see recipes/).")
    if deepspeed and isinstance(deepspeed, str):
        if deepspeed.lstrip().startswith("{"):
            text, where = deepspeed, "inline JSON"
        elif file_problem(deepspeed):
            problems.append(f"--deepspeed: {file_problem(deepspeed)} Pass a DeepSpeed JSON (see ds_configs/).")
            return problems
        else:
            text, where = open(deepspeed, encoding="utf-8", errors="replace").read(), deepspeed
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            problems.append(f"--deepspeed {where}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}).")
    return problems
