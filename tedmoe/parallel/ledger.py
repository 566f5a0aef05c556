"""The communication ledger: what every collective moves, per phase, kind and mesh axis.

Every collective in tedmoe goes through ``tedmoe.parallel.comm``, which records it in ``LEDGER``.
What the ledger counts as **bytes sent** by one rank for one call, with ``n`` the axis size and
``B`` the bytes of the tensor this rank hands in:

=================  ============================================  ==========================
kind               bytes sent                                    model
=================  ============================================  ==========================
all_reduce         ``2 * (n - 1) * ceil(numel / n) * itemsize``  ring: reduce-scatter +
                                                                 all-gather of n chunks
all_gather         ``(n - 1) * B``                               each shard reaches n-1 peers
reduce_scatter     ``(n - 1) * B / n``                           ring; B divisible by n
all_to_all         bytes of the chunks addressed to other ranks  direct; own chunk stays
=================  ============================================  ==========================

``payload`` is ``B`` itself (the message size). Calls and bytes are kept per
``(phase, kind, axis)``; the phase is ``"bwd"`` inside autograd backward and otherwise the
innermost ``LEDGER.phase(...)`` scope (default ``"fwd"``).

A ledger as data is ``{phase: {"kind/axis": {"calls", "bytes", "payload"}}}``
(``CommLedger.as_dict()``); predictions (the MoE dispatcher's ``capacity_comm``, the planner)
build the same form with ``add`` and ``merge``, so a prediction and a measurement compare with ``==``.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


@dataclass
class LedgerEntry:
    calls: int = 0
    bytes: int = 0
    payload: int = 0


def sent_bytes(kind: str, n: int, numel: int, itemsize: int, send_numel: int | None = None) -> int:
    """Bytes one rank sends for one collective (the table in the module docstring)."""
    if n == 1:
        return 0
    if kind == "all_reduce":
        return 2 * (n - 1) * math.ceil(numel / n) * itemsize
    if kind == "all_gather":
        return (n - 1) * numel * itemsize
    if kind == "reduce_scatter":
        return (n - 1) * (numel // n) * itemsize
    if kind == "all_to_all":
        assert send_numel is not None, "all_to_all needs the element count sent to other ranks"
        return send_numel * itemsize
    raise ValueError(f"unknown collective kind {kind!r}; valid kinds are {', '.join(KINDS)}")


class CommLedger:
    """Counts calls, bytes sent and payload per (phase, kind, axis). Off until enabled."""

    def __init__(self) -> None:
        self.enabled = False
        self.entries: dict[tuple[str, str, str], LedgerEntry] = defaultdict(LedgerEntry)
        self._phases: list[str] = ["fwd"]

    def record(self, kind: str, axis: str, sent: int, payload: int, phase: str | None = None) -> None:
        if not self.enabled:
            return
        entry = self.entries[(phase or self._phases[-1], kind, axis)]
        entry.calls += 1
        entry.bytes += sent
        entry.payload += payload

    def reset(self) -> None:
        self.entries.clear()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record collectives issued (outside autograd backward) in this block under ``name``."""
        self._phases.append(name)
        try:
            yield
        finally:
            self._phases.pop()

    @contextlib.contextmanager
    def capture(self, reset: bool = True) -> Iterator[CommLedger]:
        """Enable recording for a block (clearing old entries first unless ``reset=False``)."""
        was, self.enabled = self.enabled, True
        if reset:
            self.reset()
        try:
            yield self
        finally:
            self.enabled = was

    def total(self, kind: str | None = None, axis: str | None = None, phase: str | None = None) -> LedgerEntry:
        """Sum of the entries matching every given filter."""
        out = LedgerEntry()
        for (p, k, a), e in self.entries.items():
            if kind in (None, k) and axis in (None, a) and phase in (None, p):
                out.calls += e.calls
                out.bytes += e.bytes
                out.payload += e.payload
        return out

    def as_dict(self) -> dict[str, dict[str, dict[str, int]]]:
        """``{phase: {"kind/axis": {"calls", "bytes", "payload"}}}``, sorted."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for (p, k, a), e in sorted(self.entries.items()):
            out.setdefault(p, {})[f"{k}/{a}"] = {"calls": e.calls, "bytes": e.bytes, "payload": e.payload}
        return out

    def table(self) -> str:
        """A fixed-width table of every entry and the total."""
        rows = [(p, k, a, e.calls, e.bytes, e.payload) for (p, k, a), e in sorted(self.entries.items())]
        t = self.total()
        rows.append(("total", "", "", t.calls, t.bytes, t.payload))
        head = ("phase", "kind", "axis", "calls", "bytes sent", "payload")
        cells = [head] + [(p, k, a, f"{c:,}", f"{b:,}", f"{pl:,}") for p, k, a, c, b, pl in rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)


LEDGER = CommLedger()


def add(out: dict, phase: str, kind: str, axis: str, n: int, numel: int, itemsize: int,
        send_numel: int | None = None, calls: int = 1) -> None:
    """Add ``calls`` collectives of ``numel`` elements on an axis of ``n`` ranks to a ledger dict
    (nothing for ``n == 1``, as nothing runs)."""
    if n == 1 or calls == 0:
        return
    e = out.setdefault(phase, {}).setdefault(f"{kind}/{axis}", {"calls": 0, "bytes": 0, "payload": 0})
    e["calls"] += calls
    e["bytes"] += calls * sent_bytes(kind, n, numel, itemsize, send_numel)
    e["payload"] += calls * numel * itemsize


def merge(out: dict, part: dict, times: int = 1) -> None:
    """Add ledger dict ``part``, ``times`` over, into ``out``."""
    for phase, entries in part.items():
        for key, e in entries.items():
            d = out.setdefault(phase, {}).setdefault(key, {"calls": 0, "bytes": 0, "payload": 0})
            for f in ("calls", "bytes", "payload"):
                d[f] += times * e[f]
