"""How each parameter is split over the mesh, and moving between full and sharded weights.

Layers tag their parameters with ``mark``: the tensor dim split over ``tp`` and the one split
over ``ep`` (``None`` = replicated on that axis). Everything model-agnostic that needs the
layout (loading a single-process state dict, gathering it back, reducing gradients over
``dp`` or ``edp``, counting each element once in the gradient norm, the DTensor placements of
checkpoints) reads these tags through the functions here: this module is their one owner.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from tedmoe.parallel import comm
from tedmoe.parallel.topology import Topology


def mark(param: nn.Parameter | None, tp_dim: int | None = None, ep_dim: int | None = None) -> None:
    if param is not None:
        param.tp_dim, param.ep_dim = tp_dim, ep_dim


def tp_dim(param: torch.Tensor) -> int | None:
    return getattr(param, "tp_dim", None)


def is_expert(param: torch.Tensor) -> bool:
    """Expert parameters are split over ``ep`` and reduced over ``edp`` (not ``dp``)."""
    return getattr(param, "ep_dim", None) is not None


def replica_axis(param: torch.Tensor) -> str:
    """The mesh axis over which ``param`` is replicated: its gradient is averaged over it and its
    optimizer states are sharded over it (ZeRO). ``edp`` for experts, ``dsp`` for the rest."""
    return "edp" if is_expert(param) else "dsp"


def counted_once(param: torch.Tensor, tp_rank: int) -> bool:
    """Whether this rank's copy counts in a sum over the whole model (e.g. the gradient norm): a
    tp-sharded parameter always, one replicated over ``tp`` on tp rank 0 only."""
    return tp_dim(param) is not None or tp_rank == 0


def as_dtensor(local: torch.Tensor, param: torch.Tensor, topology: Topology):
    """``local`` (this rank's shard of ``param``, or a tensor shaped like it) as a DTensor over the
    parameter's mesh: experts over ``(edp, ep, tp)``, the rest over ``(dp, sp, tp)``, sharded where
    the tags say and replicated elsewhere (what ``torch.distributed.checkpoint`` needs to reshard).
    One process: ``local`` itself."""
    if topology.world_size == 1:
        return local
    from torch.distributed.tensor import DTensor, Replicate, Shard

    tp = Shard(tp_dim(param)) if tp_dim(param) is not None else Replicate()
    if is_expert(param):
        return DTensor.from_local(local, topology.expert_mesh, [Replicate(), Shard(param.ep_dim), tp], run_check=False)
    return DTensor.from_local(local, topology.mesh, [Replicate(), Replicate(), tp], run_check=False)


def shard_of(full: torch.Tensor, param: torch.Tensor, topology: Topology) -> torch.Tensor:
    """This rank's slice of the full tensor for ``param``."""
    out = full
    if is_expert(param):
        out = comm.local_slice(out, topology.axis("ep"), param.ep_dim)
    if tp_dim(param) is not None:
        out = comm.local_slice(out, topology.axis("tp"), tp_dim(param))
    if out.shape != param.shape:
        raise ValueError(f"a full tensor of shape {tuple(full.shape)} does not shard to the parameter's "
                         f"shape {tuple(param.shape)}; was the checkpoint made for another model config?")
    return out


def full_of(shard: torch.Tensor, param: torch.Tensor, topology: Topology) -> torch.Tensor:
    """Gather a tensor shaped like ``param``'s shard (the weight or its grad) to full shape."""
    out = shard
    if tp_dim(param) is not None:
        out = comm.all_gather(out, topology.axis("tp"), tp_dim(param))
    if is_expert(param):
        out = comm.all_gather(out, topology.axis("ep"), param.ep_dim)
    return out


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor], topology: Topology) -> None:
    """Load a single-process state dict into a (possibly sharded) module."""
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(shard_of(state[name].to(p.dtype), p, topology))


def full_state_dict(module: nn.Module, topology: Topology, grads: bool = False) -> dict[str, torch.Tensor]:
    """The single-process state dict (or gradients) of a sharded module, on every rank."""
    out = {}
    for name, p in module.named_parameters():
        t = p.grad if grads else p.detach()
        if t is None:
            t = torch.zeros_like(p)
        out[name] = full_of(t, p, topology)
    return out


def init_layout_invariant(module: nn.Module, topology: Topology, seed: int,
                          init_full: Callable[[str, tuple[int, ...], torch.Generator], torch.Tensor],
                          only: set[int] | None = None) -> None:
    """Initialise every parameter as the slice of a full tensor drawn from ``(seed, name)``,
    so every layout starts from the same single-process weights. ``only``: the ids of the
    parameters to initialise (the others keep their values; each draw is the same either way)."""
    with torch.no_grad():
        for i, (name, p) in enumerate(module.named_parameters()):
            if only is not None and id(p) not in only:
                continue
            full_shape = list(p.shape)
            if tp_dim(p) is not None:
                full_shape[tp_dim(p)] *= topology.size("tp")
            if is_expert(p):
                full_shape[p.ep_dim] *= topology.size("ep")
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            p.copy_(shard_of(init_full(name, tuple(full_shape), g), p, topology))
