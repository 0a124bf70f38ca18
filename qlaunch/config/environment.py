"""Values qlaunch reads from the environment rather than from flags, each with its domain.

A value outside its domain is a problem reported like a bad flag (one line, exit 2, before anything loads).
"""
from __future__ import annotations

import math

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
