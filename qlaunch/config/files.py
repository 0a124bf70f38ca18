"""Checks of input files and directories that need no heavy imports (shared by finetune.py and the
launcher), and where the tokenized-data cache lives (--cache_dir)."""
from __future__ import annotations

import json
import os
import stat

CACHE_DISABLED = ("none", "off", "false", "no", "0")  # --cache_dir values that turn the cache off


def file_problem(path: str) -> str | None:
    """Why `path` cannot be read as a file (missing, a directory, not a regular file, unreadable), or None."""
    if os.path.isdir(path):
        return f"{path!r} is a directory, not a file."
    if not os.path.exists(path):
        return f"file not found: {path!r}."
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block forever, a device never end
        return f"{path!r} is not a regular file (a FIFO, socket or device)."
    if not os.access(path, os.R_OK):
        return f"{path!r} is not readable (permissions)."
    return None


def overlap_problems(outputs: dict[str, str | None], inputs: dict[str, str | None]) -> list[str]:
    """Outputs that are, contain or sit inside an input of the same command, symlinks resolved:
    writing there would change the user's model, data or adapter. Keys are the flags' names."""
    def real(path):
        return os.path.realpath(os.path.expanduser(path))

    problems = []
    for out_flag, out in outputs.items():
        if not out:
            continue
        target = real(out)
        for in_flag, given in inputs.items():
            if not given or not isinstance(given, str) or not os.path.exists(os.path.expanduser(given)):
                continue
            source = real(given)
            if target == source:
                relation = "is"
            elif source.startswith(target.rstrip(os.sep) + os.sep):
                relation = "contains"
            elif target.startswith(source.rstrip(os.sep) + os.sep):
                relation = "is inside"
            else:
                continue
            problems.append(f"{out_flag} {out!r} {relation} {in_flag} {given!r}: outputs never overlap inputs "
                            "(they would be written into); pass another directory.")
    return problems


def config_file_problems(config: str | None, deepspeed, fsdp_config=None) -> list[str]:
    """--config, --deepspeed and --fsdp_config files that cannot be read; engine JSON that does not parse."""
    problems = []
    if config and file_problem(config):
        problems.append(f"--config: {file_problem(config)} Pass the path of a YAML recipe (see recipes/).")
    for flag, value, where in (("deepspeed", deepspeed, "a DeepSpeed JSON (see ds_configs/)"),
                               ("fsdp_config", fsdp_config, "an FSDP2 JSON (see fsdp_configs/)")):
        if not value or not isinstance(value, str):
            continue
        if value.lstrip().startswith("{"):
            text, source = value, "inline JSON"
        elif file_problem(value):
            problems.append(f"--{flag}: {file_problem(value)} Pass {where}.")
            continue
        else:
            text, source = open(value, encoding="utf-8", errors="replace").read(), value
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            problems.append(f"--{flag} {source}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}).")
    return problems


def default_cache_dir() -> str:
    from huggingface_hub import constants

    return os.path.join(constants.HF_HOME, "qlaunch", "tokenized")


def resolve_cache_dir(value: str | None) -> str | None:
    """--cache_dir → the directory to use, or None when caching is off (`--cache_dir none`)."""
    if value is None or value == "" or value == "auto":
        return default_cache_dir()
    if value.strip().lower() in CACHE_DISABLED:
        return None
    return os.path.abspath(os.path.expanduser(value))


def cache_dir_problem(value: str | None) -> str | None:
    """Why --cache_dir cannot be used (a file, or not creatable / writable), or None."""
    path = resolve_cache_dir(value)
    if path is None:
        return None
    if os.path.exists(path) and not os.path.isdir(path):
        return f"--cache_dir {value!r}: exists and is not a directory; pass a directory, or none to disable the cache."
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        return (f"--cache_dir {value!r}: {parent!r} is not a writable directory; pass another directory, "
                "or none to disable the cache.")
    return None
