"""The TED rank grid, with sequence parallelism: which ranks share tp, sp, dp, ep and edp groups.

Global rank layout (outermost axis first), DESIGN.md section 1 plus Ulysses' ``sp``::

    rank = token_idx * TP + tp_idx
    token_idx = dp_idx * SP + sp_idx = edp_idx * EP + ep_idx

TP is innermost so a TP group sits inside one node. ``token_idx`` numbers the ranks that hold
different tokens (different sequences over ``dp``, different chunks of a sequence over ``sp``);
the flattened ``(dp, sp)`` axis is ``dsp``, over which non-expert gradients are reduced. MoE
layers see every token-holding rank alike: an EP group is EP consecutive token ranks (so with
``sp > 1`` it first spans the chunks of the same sequences), EDP strides over EP groups, and
expert gradients are reduced over ``edp``. With ``sp = 1`` this is exactly the DeepSpeed-TED
layout (``dsp`` = ``dp``).

Non-expert parameters live on the ``(dp, sp, tp)`` grid, expert parameters on
``(edp, ep, tp)``. ``axis_groups`` is a pure function (no process groups) so the layout is
unit-tested without spawning. ``Topology`` validates the degrees, then builds the named-axis
``DeviceMesh``es once; modules receive it explicitly. With world size 1 no process group
is needed and every collective is the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# Two factorisations of the same rank order, outermost axis first.
DENSE_GRID = ("dp", "sp", "tp")
EXPERT_GRID = ("edp", "ep", "tp")
# axis -> (grid, the grid axes it flattens)
AXES = {"dp": (DENSE_GRID, ("dp",)), "sp": (DENSE_GRID, ("sp",)), "tp": (DENSE_GRID, ("tp",)),
        "dsp": (DENSE_GRID, ("dp", "sp")), "world": (DENSE_GRID, DENSE_GRID),
        "ep": (EXPERT_GRID, ("ep",)), "edp": (EXPERT_GRID, ("edp",))}
ALL_AXES = ("dp", "tp", "ep", "edp", "sp", "dsp", "world")


@dataclass(frozen=True)
class ParallelDims:
    """Validated parallel degrees: ``dp = world_size / (tp sp)``, ``edp = dp sp / ep``."""

    world_size: int
    tp: int = 1
    ep: int = 1
    sp: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "tp", "ep", "sp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.world_size % self.tp:
            raise ValueError(
                f"tp={self.tp} does not divide world_size={self.world_size}; "
                f"choose tp from the divisors of {self.world_size}: {_divisors(self.world_size)}"
            )
        if (self.world_size // self.tp) % self.sp:
            raise ValueError(
                f"sp={self.sp} does not divide world_size / tp = {self.world_size // self.tp}; "
                f"choose sp from {_divisors(self.world_size // self.tp)}"
            )
        if self.tokens % self.ep:
            what = "the data-parallel size dp" if self.sp == 1 else "dp x sp"
            raise ValueError(
                f"ep={self.ep} does not divide {what}={self.tokens} "
                f"(world_size={self.world_size} / tp={self.tp}); "
                f"choose ep from {_divisors(self.tokens)}, or change tp so that it is a multiple of {self.ep}"
            )

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.sp)

    @property
    def tokens(self) -> int:
        """Ranks holding different tokens: ``dp x sp``."""
        return self.world_size // self.tp

    @property
    def edp(self) -> int:
        return self.tokens // self.ep

    def size(self, axis: str) -> int:
        _check_axis(axis)
        if axis == "world":
            return self.world_size
        if axis == "dsp":
            return self.tokens
        return getattr(self, axis)

    def grid_shape(self, grid: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(self.size(a) for a in grid)

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's coordinate on every axis."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} is outside world_size={self.world_size}")
        token_idx, tp_idx = divmod(rank, self.tp)
        dp_idx, sp_idx = divmod(token_idx, self.sp)
        edp_idx, ep_idx = divmod(token_idx, self.ep)
        return {"dp": dp_idx, "tp": tp_idx, "ep": ep_idx, "edp": edp_idx, "sp": sp_idx, "dsp": token_idx,
                "world": rank}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_axis(axis: str) -> None:
    if axis not in ALL_AXES:
        raise ValueError(f"unknown mesh axis {axis!r}; valid axes are {', '.join(ALL_AXES)}")


def axis_groups(dims: ParallelDims, axis: str) -> list[list[int]]:
    """Every group of global ranks along ``axis``, each listed in axis-coordinate order.

    Groups are ordered by the remaining axes, innermost (tp) varying slowest, which
    reproduces the DeepSpeed-TED listing: for G=16, TP=2, EP=4 the EP groups are
    [0,2,4,6] [8,10,12,14] [1,3,5,7] [9,11,13,15].
    """
    _check_axis(axis)
    grid_axes, members = AXES[axis]
    grid = torch.arange(dims.world_size).reshape(dims.grid_shape(grid_axes))
    rest = [a for a in grid_axes if a not in members][::-1]
    order = [grid_axes.index(a) for a in rest + list(members)]
    groups = grid.permute(order).reshape(-1, math.prod(dims.size(a) for a in members))
    return groups.tolist()


@dataclass(frozen=True)
class Axis:
    """One mesh axis as seen from this rank: its size, this rank's coordinate, its group."""

    name: str
    size: int
    rank: int
    ranks: tuple[int, ...]
    group: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)


class Topology:
    """The rank grid for ``(world_size, tp, ep, sp)``, owning the named-axis device meshes.

    ``mesh`` is the non-expert ``(dp, sp, tp)`` mesh, ``expert_mesh`` the ``(edp, ep, tp)`` mesh
    and ``token_mesh`` the ``(dsp, tp)`` mesh. Build it on every rank, after ``torch.distributed``
    is initialised (unless ``world_size == 1``). Degrees are validated before any group is created.
    """

    def __init__(self, world_size: int, tp: int = 1, ep: int = 1, sp: int = 1, *, device_type: str | None = None,
                 timeout_s: float | None = None):
        self.dims = ParallelDims(world_size, tp, ep, sp)
        self.device_type = device_type or _default_device_type()
        self.mesh = self.expert_mesh = self.token_mesh = None
        if world_size == 1:
            self.rank = 0
        else:
            if not dist.is_initialized():
                raise ValueError(
                    f"world_size={world_size} needs torch.distributed to be initialised first; "
                    "launch with torchrun (or call torch.distributed.init_process_group)"
                )
            if dist.get_world_size() != world_size:
                raise ValueError(
                    f"world_size={world_size} does not match the {dist.get_world_size()} launched "
                    f"ranks; pass world_size={dist.get_world_size()} or launch {world_size} ranks"
                )
            from torch.distributed.device_mesh import DeviceMesh

            self.rank = dist.get_rank()
            d, ranks = self.dims, torch.arange(world_size)
            opts = _group_options(timeout_s)

            def mesh(shape, names):
                override = {"backend_override": (opts,) * len(names)} if opts else {}
                return DeviceMesh(self.device_type, ranks.reshape(shape), mesh_dim_names=names, **override)

            self.mesh = mesh(d.grid_shape(DENSE_GRID), DENSE_GRID)
            self.expert_mesh = mesh(d.grid_shape(EXPERT_GRID), EXPERT_GRID)
            self.token_mesh = mesh((d.tokens, d.tp), ("dsp", "tp")) if sp > 1 else None
        self.coords = self.dims.coords(self.rank)
        self._axes = {a: self._make_axis(a) for a in ALL_AXES}

    @classmethod
    def single(cls) -> Topology:
        """A one-process topology: no process groups, every collective is the identity."""
        return cls(1)

    def _make_axis(self, name: str) -> Axis:
        size = self.dims.size(name)
        ranks = next(g for g in axis_groups(self.dims, name) if self.rank in g)
        group = None
        if size > 1 and name == "world":
            group = dist.group.WORLD
        elif size > 1 and name == "dsp":
            group = self.mesh.get_group("dp") if self.token_mesh is None else self.token_mesh.get_group("dsp")
        elif size > 1:
            mesh = self.mesh if name in DENSE_GRID else self.expert_mesh
            group = mesh.get_group(name)
        if group is not None:
            assert dist.get_process_group_ranks(group) == sorted(ranks), (name, ranks)
        name = "dp" if name == "dsp" and self.dims.sp == 1 else name  # the same group: keep one name
        return Axis(name, size, self.coords[name], tuple(ranks), group)

    def axis(self, name: str) -> Axis:
        _check_axis(name)
        return self._axes[name]

    def size(self, name: str) -> int:
        return self.axis(name).size

    def coord(self, name: str) -> int:
        return self.axis(name).rank

    def group(self, name: str) -> dist.ProcessGroup | None:
        return self.axis(name).group

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def device(self) -> torch.device:
        if self.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device(self.device_type)

    def __repr__(self) -> str:
        d = self.dims
        return (f"Topology(world_size={d.world_size}, tp={d.tp}, ep={d.ep}, sp={d.sp}, dp={d.dp}, edp={d.edp}, "
                f"rank={self.rank})")


def _group_options(timeout_s: float | None):
    """(backend, options) that give every mesh sub-group the run's collective timeout (sub-groups
    otherwise get torch's default of 10 to 30 minutes, whatever the world group was given)."""
    if timeout_s is None:
        return None
    from datetime import timedelta

    backend = dist.get_backend()
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
    elif backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
    else:
        return None
    opts._timeout = timedelta(seconds=timeout_s)
    return backend, opts


def _default_device_type() -> str:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return "cuda"
    return "cpu"
