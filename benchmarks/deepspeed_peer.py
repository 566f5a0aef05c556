"""DeepSpeed's MoE layer (``deepspeed.moe.layer.MoE``) as the peer that ``benchmarks/moe_layer.py
--layouts --peer deepspeed`` times beside tedmoe's ``MoE`` at the same shapes, in the same process
group, in every layout. Imported only when that peer is asked for.

Reproduce from a virtualenv with tedmoe and DeepSpeed (``python -m venv ds && ds/bin/pip install
torch==2.13.0 && ds/bin/pip install -e '.[peer]'``)::

    ds/bin/python benchmarks/moe_layer.py --layouts --peer deepspeed
    ds/bin/python benchmarks/moe_layer.py --layouts --peer deepspeed --tokens 256 --repeats 2   (quick)

Settings that match tedmoe's layer (``MoEConfig(top_k=2, capacity_factor=1.0, min_capacity=4)``):

* ``k=2``, ``capacity_factor=eval_capacity_factor=1.0``, ``min_capacity=4``, ``drop_tokens=True``:
  both give every expert ``max(4, ceil(k * cf * S / E))`` slots for S tokens per rank;
* no noise: ``noisy_gate_policy=None`` and ``top2_2nd_expert_sampling=False`` (DeepSpeed's default
  would add Gumbel noise to the second choice), ``use_rts=False`` (no random token selection);
* the same drop order: DeepSpeed's top2gating fills each expert with all first choices in token
  order, then the second choices, which is tedmoe's ``drop_policy="position"``;
* gates: the two chosen softmax probabilities are normalised to sum to 1, as DeepSpeed's top2gating
  does; DeepSpeed normalises over the choices kept after the capacity cut, tedmoe over both chosen
  experts before it, so the two differ only for tokens that lost one of their choices;
* the router: a bias-free fp32 linear gate; ``build(router=...)`` gives it tedmoe's router
  weights, so both layers route (and drop) the same tokens;
* with TP > 1 DeepSpeed splits each expert's slots over the TP ranks before the all-to-all and
  gathers them after it, which is tedmoe's duplicate token dropping (``MoEConfig.dtd=True``).

The expert is ``nn.Sequential(Linear(H, F), GELU(), Linear(F, H))`` without biases for TP = 1
(DeepSpeed runs its local experts one after another). For TP > 1
(``enable_expert_tensor_parallelism=True``) it is built Megatron-style: the input enters through
"copy to region" (identity forward, all-reduce of the gradient over the TP group), a
column-parallel ``Linear(H, F/tp)``, GELU, a row-parallel ``Linear(F/tp, H)`` and an all-reduce
over the TP group (identity backward). DeepSpeed learns the TP groups from an ``mpu`` object placed
in ``deepspeed.utils.groups.mpu`` (``TensorParallelUnit``: TP groups of consecutive ranks, TP
innermost as in tedmoe's ``Topology``), which ``deepspeed.initialize`` would otherwise set; its
expert-parallel groups then come out as tedmoe's (for TP 2, EP 2 on 4 ranks: [0, 2] and [1, 3]).
DeepSpeed's TP token gather needs one adjustment to run on gloo (``_gather_into_rows``).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def missing() -> str | None:
    """``None`` if DeepSpeed imports, else why not (one line)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            importlib.import_module("deepspeed.moe.layer")
    except Exception as err:  # ImportError, or a broken install
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


# torch 2.13 renamed the collective DeepSpeed's TP token gather calls; it says so on every call
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


class TensorParallelUnit:
    """The ``mpu`` DeepSpeed asks for its tensor- and data-parallel groups. TP groups are
    consecutive ranks ``[0..tp-1], [tp..2tp-1], ...``; DP groups take one rank of each TP group.
    Every rank must build it (it creates process groups, in the same order on every rank)."""

    def __init__(self, tp: int):
        world, rank = dist.get_world_size(), dist.get_rank()
        self.tp, self.dp = tp, world // tp
        self.tp_ranks = list(range(rank - rank % tp, rank - rank % tp + tp))
        self.dp_ranks = list(range(rank % tp, world, tp))
        for start in range(0, world, tp):
            group = dist.new_group(list(range(start, start + tp)))
            if rank in range(start, start + tp):
                self.tp_group = group
        for lane in range(tp):
            group = dist.new_group(list(range(lane, world, tp)))
            if rank % tp == lane:
                self.dp_group = group

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_ranks.index(dist.get_rank())

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    # the older Megatron names for the same group
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_group = get_tensor_model_parallel_group

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_rank(self) -> int:
        return self.dp_ranks.index(dist.get_rank())

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.dp_ranks


def _tp_group():
    from deepspeed.utils import groups

    return groups.mpu.get_tensor_model_parallel_group()


class _EnterTP(torch.autograd.Function):
    """Copy to the TP region: identity forward, all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=_tp_group())
        return grad


class _LeaveTP(torch.autograd.Function):
    """Reduce from the TP region: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        out = x.contiguous().clone()
        dist.all_reduce(out, group=_tp_group())
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad


class TensorParallelExpert(nn.Module):
    """One expert MLP split over the TP group: column-parallel ``H -> F/tp``, GELU, row-parallel
    ``F/tp -> H``, summed over the group. The group is looked up at run time (DeepSpeed deep-copies
    the expert once per local expert, and a process group does not copy)."""

    def __init__(self, hidden: int, ffn: int, tp: int):
        super().__init__()
        self.up = nn.Linear(hidden, ffn // tp, bias=False)
        self.down = nn.Linear(ffn // tp, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LeaveTP.apply(self.down(F.gelu(self.up(_EnterTP.apply(x)))))


def _gather_into_rows(all_gather_into_tensor):
    """DeepSpeed's TP token gather passes a flat output buffer for a ``[E, C/tp, H]`` input; gloo
    wants the output shaped as the inputs stacked along dim 0. The bytes are the same, so hand
    gloo that view of the buffer (NCCL takes either)."""
    def gather(output_tensor, tensor, *args, **kwargs):
        if output_tensor.dim() == 1 and tensor.dim() > 1:
            output_tensor = output_tensor.view(-1, *tensor.shape[1:])
        return all_gather_into_tensor(output_tensor, tensor, *args, **kwargs)
    gather.wraps_for_gloo = True
    return gather


def build(hidden: int, ffn: int, experts: int, tp: int, ep: int, router: torch.Tensor | None = None,
          seed: int = 0) -> nn.Module:
    """DeepSpeed's MoE layer for this rank, in the already initialised default process group
    (``deepspeed.init_distributed`` wraps it rather than starting another), its gate set to
    ``router`` ``[E, H]`` if given. Its forward returns ``(y, l_aux, exp_counts)``."""
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints as it sets up its groups
        import deepspeed
        from deepspeed.moe.layer import MoE
        from deepspeed.utils import groups

        deepspeed.init_distributed(dist_backend="gloo")
        if tp > 1 and groups.mpu is None:
            groups.mpu = TensorParallelUnit(tp)
            if not hasattr(deepspeed.comm.all_gather_into_tensor, "wraps_for_gloo"):
                deepspeed.comm.all_gather_into_tensor = _gather_into_rows(deepspeed.comm.all_gather_into_tensor)
        torch.manual_seed(seed)
        if tp > 1:
            expert = TensorParallelExpert(hidden, ffn, tp)
        else:
            expert = nn.Sequential(nn.Linear(hidden, ffn, bias=False), nn.GELU(), nn.Linear(ffn, hidden, bias=False))
        layer = MoE(hidden_size=hidden, expert=expert, num_experts=experts, ep_size=ep, k=2, capacity_factor=1.0,
                    eval_capacity_factor=1.0, min_capacity=4, use_residual=False, noisy_gate_policy=None,
                    drop_tokens=True, use_rts=False, enable_expert_tensor_parallelism=tp > 1,
                    top2_2nd_expert_sampling=False)
        layer.set_deepspeed_parallelism()  # creates (or finds) its expert-parallel groups
    if router is not None:
        with torch.no_grad():
            layer.deepspeed_moe.gate.wg.weight.copy_(router)
    return layer


def finite(layer: nn.Module, x: torch.Tensor) -> bool:
    """One forward + backward of ``layer`` on ``x``: are the output and the input gradient finite
    on every rank?"""
    xg = x.detach().requires_grad_(True)
    y = layer(xg)[0]
    y.sum().backward()
    ok = torch.tensor([float(torch.isfinite(y).all() and torch.isfinite(xg.grad).all())])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())
