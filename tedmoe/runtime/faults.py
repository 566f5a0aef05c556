"""Fault injection for tests of failure handling: ``TEDMOE_FAULT="kind@rank:step"``.

Kinds: ``kill`` (SIGKILL this rank at the start of the step), ``hang`` (sleep forever there),
``raise`` (raise an error there), ``kill_in_save`` (SIGKILL while the checkpoint of that step is
being written, after the shards and before it is complete), ``nan`` (make the loss of that step
NaN; ``rank`` may be ``all``), ``sigint`` (send SIGINT to this process's whole process group at
the start of the step, as Ctrl-C in a terminal does). Several faults are separated by commas. Unset: nothing happens.
"""

from __future__ import annotations

import os
import signal
import time


def _faults() -> list[tuple[str, str, int]]:
    spec = os.environ.get("TEDMOE_FAULT", "")
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, where = item.partition("@")
        rank, _, step = where.partition(":")
        out.append((kind, rank, int(step)))
    return out


def active(kind: str, rank: int, step: int) -> bool:
    return any(k == kind and r in (str(rank), "all") and s == step for k, r, s in _faults())


def maybe_fail(point: str, rank: int, step: int) -> None:
    """Carry out a fault planned for this point, rank and step."""
    if point == "step":
        if active("kill", rank, step):
            os.kill(os.getpid(), signal.SIGKILL)
        if active("hang", rank, step):
            while True:
                time.sleep(60)
        if active("sigint", rank, step):
            os.killpg(os.getpgrp(), signal.SIGINT)
        if active("raise", rank, step):
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")
    if point == "save" and active("kill_in_save", rank, step):
        os.kill(os.getpid(), signal.SIGKILL)
