"""The local experts as one grouped MLP, tensor-parallel over ``tp``.

Legend: L local experts (E / ep), T tokens per expert (padded), H hidden, F ffn, n = tp.
Weights: ``w1 [L, H, F/n]`` (and ``w3`` for SwiGLU), column-parallel; ``w2 [L, F/n, H]``,
row-parallel. ``forward`` returns the *un-reduced* partial sum over ``tp``: the dispatcher
reduces it once for all local experts (an all-reduce, or a reduce-scatter under DTD) on
the real token rows, so padding never travels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tedmoe.config import MoEConfig
from tedmoe.parallel.sharding import full_state_dict, load_full_state_dict, mark
from tedmoe.parallel.topology import Topology

# parameter name -> tensor dim split over tp (dim 0 is always split over ep)
TP_DIMS = {"w1": 2, "w3": 2, "w2": 1}


class _GeluMLP(torch.autograd.Function):
    """``gelu(x @ w1) @ w2`` per expert, as autograd would compute it (same operations, same
    saved tensors), except that the activation's backward overwrites its incoming gradient
    instead of allocating another ``[L, T, F]`` buffer."""

    @staticmethod
    def forward(ctx, x_LTH, w1, w2):
        h_LTF = torch.bmm(x_LTH, w1)
        a_LTF = F.gelu(h_LTF)
        ctx.save_for_backward(x_LTH, w1, w2, h_LTF, a_LTF)
        return torch.bmm(a_LTF, w2)

    @staticmethod
    def backward(ctx, grad_LTH):
        x_LTH, w1, w2, h_LTF, a_LTF = ctx.saved_tensors
        grad_w2 = torch.bmm(a_LTF.transpose(1, 2), grad_LTH)
        grad_LTF = torch.bmm(grad_LTH, w2.transpose(1, 2))
        torch.ops.aten.gelu_backward.grad_input(grad_LTF, h_LTF, grad_input=grad_LTF)
        grad_x = torch.bmm(grad_LTF, w1.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        return grad_x, torch.bmm(x_LTH.transpose(1, 2), grad_LTF), grad_w2


class GroupedExperts(nn.Module):
    """``L`` bias-free two-layer MLPs applied with batched matmuls (no loop over experts)."""

    def __init__(self, hidden_size: int, config: MoEConfig, topology: Topology, device=None, dtype=None):
        super().__init__()
        self.config, self.topology = config, topology
        self.tp, self.ep = topology.axis("tp"), topology.axis("ep")
        L, H = config.num_experts // self.ep.size, hidden_size
        Fn = config.ffn_hidden_size // self.tp.size
        kw = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(torch.empty(L, H, Fn, **kw))
        self.w3 = nn.Parameter(torch.empty(L, H, Fn, **kw)) if config.activation == "swiglu" else None
        self.w2 = nn.Parameter(torch.empty(L, Fn, H, **kw))
        for name, fan_in in (("w1", H), ("w3", H), ("w2", config.ffn_hidden_size)):
            p = getattr(self, name)
            if p is not None:
                nn.init.uniform_(p, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
                mark(p, tp_dim=TP_DIMS[name], ep_dim=0)
        self.quantized = None  # integer weights (tedmoe.compress) in place of the float ones
        self.weight_transforms = None  # quantisation-aware training (tedmoe.compress.qat)

    @property
    def num_local_experts(self) -> int:
        return self.w1.shape[0]

    def forward(self, x_LTH: torch.Tensor, rows_L: list[int] | None = None) -> torch.Tensor:
        """``[L, T, H]`` -> ``[L, T, H]`` partial sums over tp. ``rows_L`` (dropless): each expert's
        real rows; without autograd only those are computed (the padding rows of the output are
        left unset: the combine never reads them), so an expert with no token costs nothing."""
        if self.quantized is not None:  # integer weights (tedmoe.compress), one expert at a time
            return self.quantized(x_LTH, rows_L)
        if rows_L is not None and not torch.is_grad_enabled() and self.weight_transforms is None:
            return self._real_rows(x_LTH, rows_L)
        t = self.weight_transforms or {}
        w1, w2 = (t[n](w) if n in t else w for n, w in (("w1", self.w1), ("w2", self.w2)))
        if self.w3 is None:
            return _GeluMLP.apply(x_LTH, w1, w2)  # partial sum over tp
        w3 = t["w3"](self.w3) if "w3" in t else self.w3
        h = F.silu(torch.bmm(x_LTH, w1)) * torch.bmm(x_LTH, w3)
        return torch.bmm(h, w2)  # partial sum over tp

    def _real_rows(self, x_LTH: torch.Tensor, rows_L: list[int]) -> torch.Tensor:
        out = x_LTH.new_empty(x_LTH.shape[0], x_LTH.shape[1], self.w2.shape[-1])
        for e, r in enumerate(rows_L):
            if r:
                x = x_LTH[e, :r]
                h = x @ self.w1[e]
                h = F.gelu(h) if self.w3 is None else F.silu(h) * (x @ self.w3[e])
                out[e, :r] = h @ self.w2[e]
        return out

    def load_full(self, full: dict[str, torch.Tensor]) -> None:
        """Copy this rank's shard out of full ``[E, ...]`` weights."""
        load_full_state_dict(self, full, self.topology)

    def full_tensors(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """Every expert weight (or its gradient) gathered to the full ``[E, ...]`` shape."""
        return full_state_dict(self, self.topology, grads)
