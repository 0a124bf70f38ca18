"""Values qlaunch reads from the environment rather than from flags, each with its domain.

A value outside its domain is a problem reported like a bad flag (one line, exit 2, before anything loads).
"""
from __future__ import annotations

import math

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # set by torchrun, deepspeed, or from srun / MPI
LEAD_VARIABLE = "QLAUNCH_SIGNAL_LEAD"  # seconds between SLURM's warning and the kill (--signal=USR1@LEAD)


def signal_lead(env) -> tuple[float | None, str | None]:
    """(the warning's lead in seconds, or None when not told; a problem with the value). The batch scripts
    set it beside their #SBATCH --signal line: SLURM does not tell a job how early it warns."""
    text = env.get(LEAD_VARIABLE)
    if text in (None, ""):
        return None, None
    try:
        lead = float(text)
    except ValueError:
        lead = math.nan
    if not math.isfinite(lead) or lead < 0:
        return None, (f"{LEAD_VARIABLE}={text!r}: the seconds between SLURM's warning signal and the kill, a "
                      "number >= 0 (the N of #SBATCH --signal=USR1@N); unset it if no warning is configured.")
    return lead, None


# Whole numbers qlaunch (or torch, from what qlaunch passes on) reads from the environment: (minimum, maximum).
PORT = (1, 65535)
LAUNCH_VARIABLES = {"NNODES": (1, None), "NODE_RANK": (0, None), "NPROC_PER_NODE": (1, None),
                    "GPUS_PER_NODE": (1, None), "MASTER_PORT": PORT, "RDZV_PORT": PORT, "MAX_RESTARTS": (0, None)}
RANK_VARIABLES = {"RANK": (0, None), "WORLD_SIZE": (1, None), "LOCAL_RANK": (0, None), "LOCAL_WORLD_SIZE": (1, None),
                  "MASTER_PORT": PORT}


def integer_variable_problems(env, domains: dict) -> list[str]:
    """Each set variable of `domains` that is not a whole number in its range, as one problem each."""
    problems = []
    for name, (low, high) in domains.items():
        text = env.get(name)
        if text in (None, ""):
            continue
        value = int(text) if text.strip().isdigit() else None
        if value is None or value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            problems.append(f"{name}={text!r}: must be a whole number {bound}.")
    return problems


def rank_variable_problems(env) -> list[str]:
    """torch's rank variables in their domains, and the rank below the world size."""
    problems = integer_variable_problems(env, RANK_VARIABLES)
    if not problems and env.get("RANK") and env.get("WORLD_SIZE") and int(env["RANK"]) >= int(env["WORLD_SIZE"]):
        problems.append(f"RANK={env['RANK']} of WORLD_SIZE={env['WORLD_SIZE']}: a rank must be below the world "
                        "size; let the launcher set them.")
    return problems
