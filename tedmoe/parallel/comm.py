"""Autograd-aware collectives over a mesh axis.

Every collective in tedmoe goes through ``_collective``, which runs it on the axis's process
group and records it in the ledger (``tedmoe.parallel.ledger``; its docstring defines the bytes
counted), or, inside a CAC recompute, replays the recorded output
(``tedmoe.parallel.activation_checkpoint``). A collective over an axis of size 1 is the
identity: nothing runs and nothing is recorded.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

from tedmoe.parallel.activation_checkpoint import replayable
from tedmoe.parallel.ledger import KINDS, LEDGER, sent_bytes  # noqa: F401 (KINDS re-exported)
from tedmoe.parallel.topology import Axis

# torch 2.13 renamed the flat-tensor collectives; older releases only have the old names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


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
        row = math.prod(x.shape[1:])  # elements per row (x may have no rows)
        send_numel = (x.shape[0] - in_splits[axis.rank]) * row
        out = x.new_empty((sum(out_splits),) + x.shape[1:])
        if len(set(in_splits) | set(out_splits)) == 1:  # the same rows to and from every rank: the even path
            dist.all_to_all_single(out, x, group=group)
        else:
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


def all_gather_into_async(out: torch.Tensor, x: torch.Tensor, axis: Axis, phase: str | None = None):
    """``all_gather_into`` started in the background (recorded when issued; never replayed, so it
    can prefetch during a CAC recompute); returns a handle whose ``wait()`` completes it, or
    ``None`` when nothing runs (an axis of size 1)."""
    if axis.size == 1:
        return None
    work = _all_gather_flat(out, x, group=axis.group, async_op=True)
    LEDGER.record("all_gather", axis.name, sent_bytes("all_gather", axis.size, x.numel(), x.element_size()),
                  x.numel() * x.element_size(), phase)
    return work


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


class _SplitAlong(torch.autograd.Function):
    """Forward: keep this rank's slice along ``dim``. Backward: all-gather the gradient slices."""

    @staticmethod
    def forward(ctx, x, axis, dim):
        ctx.axis, ctx.dim = axis, dim
        return local_slice(x, axis, dim).clone()

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.axis, ctx.dim, phase="bwd"), None, None


class _GatherSplit(torch.autograd.Function):
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


def split_along(x: torch.Tensor, axis: Axis, dim: int) -> torch.Tensor:
    """Keep this rank's 1/n slice along ``dim`` of a tensor every rank holds (e.g. a replicated
    input entering a row-parallel linear); backward all-gathers the gradient slices."""
    if axis.size == 1:
        return x
    _check_divisible(x, dim, axis)
    return _SplitAlong.apply(x, axis, dim)


def gather_split(x: torch.Tensor, axis: Axis, dim: int) -> torch.Tensor:
    """Rebuild the full tensor from every rank's slice when every rank then uses it alike (e.g.
    gathered logits); backward keeps this rank's slice of the gradient (no reduction)."""
    return x if axis.size == 1 else _GatherSplit.apply(x, axis, dim)


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
