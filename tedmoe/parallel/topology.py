"""The TED rank grid: which ranks share tensor-, expert- and data-parallel groups.

Global rank layout (outermost axis first), DESIGN.md section 1::

    rank = (edp_idx * EP + ep_idx) * TP + tp_idx,     dp_idx = edp_idx * EP + ep_idx

TP is innermost so a TP group sits inside one node; an EP group is EP consecutive
ranks of a DP group; EDP strides over EP groups. Non-expert parameters live on the
``(dp, tp)`` grid, expert parameters on ``(edp, ep, tp)``.

``axis_groups`` is a pure function (no process groups) so the layout is unit-tested
without spawning. ``Topology`` validates the degrees, then builds the named-axis
``DeviceMesh``es once; modules receive it explicitly. With world size 1 no process group
is needed and every collective is the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# Base grid axes, outermost first. "dp" is not a base axis: it is ("edp", "ep") flattened.
GRID_AXES = ("edp", "ep", "tp")
FLAT_AXES = {"dp": ("edp", "ep"), "world": GRID_AXES}
ALL_AXES = ("dp", "tp", "ep", "edp", "world")


@dataclass(frozen=True)
class ParallelDims:
    """Validated parallel degrees. ``dp = world_size / tp`` and ``edp = dp / ep``."""

    world_size: int
    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "tp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.world_size % self.tp:
            raise ValueError(
                f"tp={self.tp} does not divide world_size={self.world_size}; "
                f"choose tp from the divisors of {self.world_size}: {_divisors(self.world_size)}"
            )
        if self.dp % self.ep:
            raise ValueError(
                f"ep={self.ep} does not divide the data-parallel size dp={self.dp} "
                f"(world_size={self.world_size} / tp={self.tp}); "
                f"choose ep from {_divisors(self.dp)}, or change tp so that dp is a multiple of {self.ep}"
            )

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    def size(self, axis: str) -> int:
        _check_axis(axis)
        return self.world_size if axis == "world" else getattr(self, axis)

    def grid_shape(self) -> tuple[int, ...]:
        return tuple(self.size(a) for a in GRID_AXES)

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's coordinate on every axis."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} is outside world_size={self.world_size}")
        dp_idx, tp_idx = divmod(rank, self.tp)
        edp_idx, ep_idx = divmod(dp_idx, self.ep)
        return {"dp": dp_idx, "tp": tp_idx, "ep": ep_idx, "edp": edp_idx, "world": rank}


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
    grid = torch.arange(dims.world_size).reshape(dims.grid_shape())
    members = FLAT_AXES.get(axis, (axis,))
    rest = [a for a in GRID_AXES if a not in members][::-1]
    order = [GRID_AXES.index(a) for a in rest + list(members)]
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
    """The rank grid for ``(world_size, tp, ep)``, owning the named-axis device meshes.

    ``mesh`` is the non-expert ``(dp, tp)`` mesh and ``expert_mesh`` the ``(edp, ep, tp)``
    mesh. Build it on every rank, after ``torch.distributed`` is initialised (unless
    ``world_size == 1``). Degrees are validated before any group is created.
    """

    def __init__(self, world_size: int, tp: int = 1, ep: int = 1, *, device_type: str | None = None):
        self.dims = ParallelDims(world_size, tp, ep)
        self.device_type = device_type or _default_device_type()
        self.mesh = self.expert_mesh = None
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
            d = self.dims
            self.mesh = DeviceMesh(
                self.device_type, torch.arange(world_size).reshape(d.dp, d.tp), mesh_dim_names=("dp", "tp")
            )
            self.expert_mesh = DeviceMesh(
                self.device_type, torch.arange(world_size).reshape(d.grid_shape()), mesh_dim_names=GRID_AXES
            )
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
        elif size > 1:
            mesh = self.mesh if name in ("dp", "tp") else self.expert_mesh
            group = mesh.get_group(name)
            assert dist.get_process_group_ranks(group) == sorted(ranks), (name, ranks)
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
        return f"Topology(world_size={d.world_size}, tp={d.tp}, ep={d.ep}, dp={d.dp}, edp={d.edp}, rank={self.rank})"


def _default_device_type() -> str:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return "cuda"
    return "cpu"
