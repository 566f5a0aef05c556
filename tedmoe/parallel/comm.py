"""Autograd-aware collectives over a mesh axis, and the communication ledger.

Every collective in tedmoe goes through ``_collective``, which runs it on the axis's
process group and records it in ``LEDGER``. A collective over an axis of size 1 is the
identity: nothing runs and nothing is recorded.

What the ledger counts as **bytes sent** by one rank for one call, with ``n`` the axis
size and ``B`` the bytes of the tensor this rank hands in:

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
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from tedmoe.parallel.topology import Axis

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")

# torch 2.13 renamed the flat-tensor collectives; older releases only have the old names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


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


class CommStash:
    """Communication-aware activation checkpointing: the outputs of the collectives (and random
    draws) of a checkpointed forward are recorded, and its recompute replays them in order, so
    the recompute is local math only. The stash's tensors are the memory this costs."""

    _active: list[CommStash] = []

    def __init__(self) -> None:
        self.items: list = []
        self.mode: str | None = None

    @contextlib.contextmanager
    def _use(self, mode: str) -> Iterator[None]:
        if mode == "replay":
            self.items.reverse()  # pop() from the end returns them in recorded order
        self.mode = mode
        CommStash._active.append(self)
        try:
            yield
        finally:
            CommStash._active.pop()
            self.mode = None

    def recording(self):
        return self._use("record")

    def replaying(self):
        return self._use("replay")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.items if isinstance(t, torch.Tensor))


def replayable(fn):
    """``fn()``, except inside a CAC recompute, where the value recorded in the forward returns."""
    stash = CommStash._active[-1] if CommStash._active else None
    if stash is not None and stash.mode == "replay":
        return stash.items.pop()
    out = fn()
    if stash is not None:
        stash.items.append(out)
    return out


def _collective(kind: str, axis: Axis, x: torch.Tensor, phase: str | None, **kw) -> torch.Tensor:
    """Run one collective on ``axis`` and record it (or replay it in a CAC recompute)."""
    return replayable(lambda: _run_collective(kind, axis, x, phase, **kw))


def _run_collective(kind: str, axis: Axis, x: torch.Tensor, phase: str | None, **kw) -> torch.Tensor:
    """Run one collective on ``axis`` and record it. ``x`` must be contiguous."""
    n, group = axis.size, axis.group
    numel, itemsize = x.numel(), x.element_size()
    send_numel = None
    if kind == "all_reduce":
        out = x.clone()
        dist.all_reduce(out, op=kw.get("op", dist.ReduceOp.SUM), group=group)
    elif kind == "all_gather":
        out = kw.get("out")
        if out is None:
            out = x.new_empty((n * x.shape[0],) + x.shape[1:])
        _all_gather_flat(out, x, group=group)
    elif kind == "reduce_scatter":
        out = x.new_empty((x.shape[0] // n,) + x.shape[1:])
        _reduce_scatter_flat(out, x, group=group)
    elif kind == "all_to_all":
        in_splits, out_splits = kw["in_splits"], kw["out_splits"]
        row = x[0].numel() if x.dim() else 1
        send_numel = (x.shape[0] - in_splits[axis.rank]) * row
        out = x.new_empty((sum(out_splits),) + x.shape[1:])
        dist.all_to_all_single(out, x, list(out_splits), list(in_splits), group=group)
    else:
        raise ValueError(f"unknown collective kind {kind!r}; valid kinds are {', '.join(KINDS)}")
    LEDGER.record(kind, axis.name, sent_bytes(kind, n, numel, itemsize, send_numel), numel * itemsize, phase)
    return out


def _check_divisible(x: torch.Tensor, dim: int, axis: Axis) -> None:
    if x.shape[dim] % axis.size:
        raise ValueError(
            f"cannot split dim {dim} of a tensor of shape {tuple(x.shape)} into {axis.name}={axis.size} "
            f"equal parts; make its size a multiple of {axis.size} (pad it, or change {axis.name})"
        )


def all_reduce(x: torch.Tensor, axis: Axis, op: dist.ReduceOp = dist.ReduceOp.SUM, phase: str | None = None) -> torch.Tensor:
    """Out-of-place all-reduce over ``axis`` (no autograd)."""
    if axis.size == 1:
        return x
    return _collective("all_reduce", axis, x.contiguous(), phase, op=op)


def all_gather(x: torch.Tensor, axis: Axis, dim: int = 0, phase: str | None = None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in axis order (no autograd)."""
    if axis.size == 1:
        return x
    out = _collective("all_gather", axis, x.movedim(dim, 0).contiguous(), phase)
    return out.movedim(0, dim)


def all_gather_into(out: torch.Tensor, x: torch.Tensor, axis: Axis, phase: str | None = None) -> None:
    """Gather every rank's 1-D ``x`` into ``out`` (``n * len(x)`` long; ``x`` may be this rank's
    slice of ``out``, which is how ZeRO writes updated shards straight into the parameters)."""
    if axis.size > 1:
        _collective("all_gather", axis, x, phase, out=out)


def reduce_scatter(x: torch.Tensor, axis: Axis, dim: int = 0, phase: str | None = None) -> torch.Tensor:
    """Sum ``x`` over ``axis`` and keep this rank's 1/n slice along ``dim`` (no autograd)."""
    if axis.size == 1:
        return x
    _check_divisible(x, dim, axis)
    out = _collective("reduce_scatter", axis, x.movedim(dim, 0).contiguous(), phase)
    return out.movedim(0, dim)


def all_to_all(
    x: torch.Tensor,
    axis: Axis,
    in_splits: Sequence[int] | None = None,
    out_splits: Sequence[int] | None = None,
    phase: str | None = None,
) -> torch.Tensor:
    """Send rows ``in_splits[j]`` of dim 0 to rank j, receive ``out_splits[j]`` from rank j.

    Without splits the exchange is even (dim 0 divisible by the axis size). No autograd.
    """
    if axis.size == 1:
        return x
    if in_splits is None:
        _check_divisible(x, 0, axis)
        in_splits = out_splits = [x.shape[0] // axis.size] * axis.size
    if out_splits is None or len(in_splits) != axis.size or len(out_splits) != axis.size:
        raise ValueError(f"all_to_all over {axis.name}={axis.size} needs in_splits and out_splits of length {axis.size}")
    if sum(in_splits) != x.shape[0]:
        raise ValueError(f"in_splits {list(in_splits)} sum to {sum(in_splits)}, but dim 0 of the input is {x.shape[0]}")
    return _collective("all_to_all", axis, x.contiguous(), phase, in_splits=in_splits, out_splits=out_splits)


def local_slice(x: torch.Tensor, axis: Axis, dim: int) -> torch.Tensor:
    """This rank's 1/n slice of ``x`` along ``dim`` (a view; no communication)."""
    if axis.size == 1:
        return x
    _check_divisible(x, dim, axis)
    return x.chunk(axis.size, dim)[axis.rank]


class _CopyToRegion(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce the gradient over the axis."""

    @staticmethod
    def forward(ctx, x, axis):
        ctx.axis = axis
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return all_reduce(g, ctx.axis, phase="bwd"), None


class _ReduceFromRegion(torch.autograd.Function):
    """Forward: all-reduce over the axis. Backward: identity."""

    @staticmethod
    def forward(ctx, x, axis):
        return all_reduce(x, axis)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _AllGather(torch.autograd.Function):
    """Forward: all-gather along ``dim``. Backward: reduce-scatter the gradient along ``dim``."""

    @staticmethod
    def forward(ctx, x, axis, dim):
        ctx.axis, ctx.dim = axis, dim
        return all_gather(x, axis, dim)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter(g, ctx.axis, ctx.dim, phase="bwd"), None, None


class _ReduceScatter(torch.autograd.Function):
    """Forward: reduce-scatter along ``dim``. Backward: all-gather the gradient along ``dim``."""

    @staticmethod
    def forward(ctx, x, axis, dim):
        ctx.axis, ctx.dim = axis, dim
        return reduce_scatter(x, axis, dim)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.axis, ctx.dim, phase="bwd"), None, None


class _DropToSlice(torch.autograd.Function):
    """Forward: keep this rank's slice along ``dim``. Backward: all-gather the gradient slices."""

    @staticmethod
    def forward(ctx, x, axis, dim):
        ctx.axis, ctx.dim = axis, dim
        return local_slice(x, axis, dim).clone()

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.axis, ctx.dim, phase="bwd"), None, None


class _GatherSlices(torch.autograd.Function):
    """Forward: all-gather slices along ``dim``. Backward: keep this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, axis, dim):
        ctx.axis, ctx.dim = axis, dim
        return all_gather(x, axis, dim)

    @staticmethod
    def backward(ctx, g):
        return local_slice(g, ctx.axis, ctx.dim), None, None


class _AllToAll(torch.autograd.Function):
    """Forward: all-to-all with (in, out) splits. Backward: all-to-all with the splits swapped."""

    @staticmethod
    def forward(ctx, x, axis, in_splits, out_splits):
        ctx.axis, ctx.splits = axis, (in_splits, out_splits)
        return all_to_all(x, axis, in_splits, out_splits)

    @staticmethod
    def backward(ctx, g):
        in_splits, out_splits = ctx.splits
        return all_to_all(g, ctx.axis, out_splits, in_splits, phase="bwd"), None, None, None


def copy_to_region(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Enter a parallel region: identity forward, all-reduce of the gradient backward."""
    return x if axis.size == 1 else _CopyToRegion.apply(x, axis)


def reduce_from_region(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Leave a parallel region: all-reduce forward, identity backward."""
    return x if axis.size == 1 else _ReduceFromRegion.apply(x, axis)


def gather_along(x: torch.Tensor, axis: Axis, dim: int) -> torch.Tensor:
    """All-gather along ``dim`` whose backward reduce-scatters (consumers differ per rank)."""
    return x if axis.size == 1 else _AllGather.apply(x, axis, dim)


def reduce_scatter_along(x: torch.Tensor, axis: Axis, dim: int) -> torch.Tensor:
    """Reduce-scatter along ``dim`` whose backward all-gathers."""
    if axis.size == 1:
        return x
    _check_divisible(x, dim, axis)
    return _ReduceScatter.apply(x, axis, dim)


def drop_to_slice(x: torch.Tensor, axis: Axis, dim: int) -> torch.Tensor:
    """DTD: keep this rank's 1/n slice along ``dim``; the gradient slices are all-gathered back."""
    if axis.size == 1:
        return x
    _check_divisible(x, dim, axis)
    return _DropToSlice.apply(x, axis, dim)


def gather_slices(x: torch.Tensor, axis: Axis, dim: int) -> torch.Tensor:
    """DTD: rebuild the full tensor from every rank's slice (consumers identical on every rank)."""
    return x if axis.size == 1 else _GatherSlices.apply(x, axis, dim)


def all_to_all_autograd(
    x: torch.Tensor, axis: Axis, in_splits: Sequence[int] | None = None, out_splits: Sequence[int] | None = None
) -> torch.Tensor:
    """All-to-all over ``axis`` (even if no splits are given) whose backward is the reverse exchange."""
    if axis.size == 1:
        return x
    if in_splits is None:
        _check_divisible(x, 0, axis)
        in_splits = out_splits = [x.shape[0] // axis.size] * axis.size
    return _AllToAll.apply(x, axis, tuple(in_splits), tuple(out_splits))
