"""Fault injection for the reliability tests, driven by one environment variable.

``PEFT_DIST_FAULT=KIND:RANK:STEP[,KIND:RANK:STEP...]`` with KIND one of:
``kill`` (SIGKILL at the start of STEP), ``kill-in-checkpoint`` (SIGKILL after this rank wrote its
checkpoint shards, before the checkpoint is complete), ``signal`` (SIGUSR1 to itself at STEP, like a
scheduler's pre-timeout signal reaching one rank; STEP 0: during setup, before the base loads) and ``nan``
(the loss of STEP becomes NaN).
Unset in normal runs: every check is then a dictionary lookup that finds nothing. Under Slurm, faults
happen in a job's first run only (``SLURM_RESTART_COUNT`` 0): its requeued run is the clean one.
"""
from __future__ import annotations

import os
import signal


def _planned() -> set[tuple[str, int, int]]:
    spec = os.environ.get("PEFT_DIST_FAULT", "") if os.environ.get("SLURM_RESTART_COUNT", "0") == "0" else ""
    faults = set()
    for item in filter(None, spec.split(",")):
        kind, rank, step = item.rsplit(":", 2)
        faults.add((kind, int(rank), int(step)))
    return faults


def planned(kind: str, rank: int, step: int) -> bool:
    return (kind, rank, step) in _planned()


def inject(kind: str, rank: int, step: int) -> None:
    """Carry out a planned ``kill``, ``kill-in-checkpoint`` or ``signal`` fault, if any."""
    if not planned(kind, rank, step):
        return
    if kind == "signal":
        os.kill(os.getpid(), signal.SIGUSR1)
    else:
        os.kill(os.getpid(), signal.SIGKILL)
