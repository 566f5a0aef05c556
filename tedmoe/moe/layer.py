"""``MoE``: router + TED dispatcher + grouped tensor-parallel experts, for any layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tedmoe.config import MoEConfig
from tedmoe.moe.dtd_dispatcher import TEDDispatcher
from tedmoe.moe.experts import GroupedExperts
from tedmoe.moe.noise import TokenContext
from tedmoe.moe.router import Router, Routing
from tedmoe.parallel import comm
from tedmoe.parallel.sharding import mark
from tedmoe.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from tedmoe.parallel.topology import Topology


@dataclass
class MoEStats:
    """What one forward of the layer reports (for this rank's tokens)."""

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor  # kept pairs per global expert
    drop_fraction: torch.Tensor  # dropped pairs / (S * K)


class ResidualMLP(nn.Module):
    """Residual-MoE's dense branch: an MLP like one expert (same activation and width, no biases),
    tensor-parallel (column-parallel in, row-parallel out)."""

    def __init__(self, hidden_size: int, config: MoEConfig, topology: Topology, device=None, dtype=None):
        super().__init__()
        self.tp, F_ = topology.axis("tp"), config.ffn_hidden_size
        kw = {"bias": False, "copy_input": False, "device": device, "dtype": dtype}
        self.w1 = ColumnParallelLinear(hidden_size, F_, self.tp, **kw)
        self.w3 = ColumnParallelLinear(hidden_size, F_, self.tp, **kw) if config.activation == "swiglu" else None
        self.w2 = RowParallelLinear(F_, hidden_size, self.tp, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = comm.copy_to_region(x, self.tp)
        h = self.w1(x)
        h = F.gelu(h) if self.w3 is None else F.silu(h) * self.w3(x)
        return self.w2(h)


class MoE(nn.Module):
    """A Mixture-of-Experts MLP of width ``hidden_size`` (H). ``forward(x [..., H])`` returns ``(y [..., H], MoEStats)``;
    dropped tokens give zero (the caller adds the residual). With ``config.residual`` (Residual-MoE)
    a dense branch runs on every token and a learned per-token coefficient mixes it in."""

    def __init__(self, hidden_size: int, config: MoEConfig, topology: Topology, device=None, dtype=None,
                 layer: int = 0, context: TokenContext | None = None):
        super().__init__()
        config.validate(topology.size("tp"), topology.size("ep"))
        self.config = config
        # which tokens a forward sees (keys the router's draws); a layer on its own counts steps
        self.context, self._own_context = context or TokenContext(), context is None
        self.router = Router(hidden_size, config, device=device, dtype=dtype, sp=topology.axis("sp"), layer=layer)
        self.experts = GroupedExperts(hidden_size, config, topology, device=device, dtype=dtype)
        self.dispatcher = TEDDispatcher(config.num_experts, config.top_k, topology, config.dtd)
        if config.residual:
            self.residual = ResidualMLP(hidden_size, config, topology, device=device, dtype=dtype)
            self.coefficient = nn.Linear(hidden_size, 2, device=device, dtype=dtype)
            mark(self.coefficient.weight)
            mark(self.coefficient.bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats]:
        """``positions`` ``[B, t]``: the tokens' places in their sequences when they are a subset
        of them (random-LTD), which keys the router's draws like the whole sequence's."""
        x_SH = x.reshape(-1, x.shape[-1])
        batch, length = (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, x_SH.shape[0])
        ids = self.context.token_ids(batch, length, x.device, positions)
        routing: Routing = self.router(x_SH, ids, self.context.step)
        if self._own_context and self.training and torch.is_grad_enabled():
            self.context.step += 1
        expert_in, plan = self.dispatcher.dispatch(x_SH, routing)
        y_SH = self.dispatcher.combine(self.experts(expert_in, plan.rows_L), routing, plan)
        if self.config.residual:  # Residual-MoE: mix the experts' output with the dense branch, per token
            coef = torch.softmax(self.coefficient(x_SH).float(), dim=-1).to(y_SH.dtype)
            y_SH = y_SH * coef[:, :1] + self.residual(x_SH) * coef[:, 1:]
        stats = MoEStats(routing.aux_loss, routing.z_loss, routing.tokens_per_expert_E,
                         routing.num_dropped.float() / routing.expert_SK.numel())
        return y_SH.view_as(x), stats

    def load_full(self, router_weight: torch.Tensor, experts: dict[str, torch.Tensor]) -> None:
        """Load single-process weights: router ``[E, H]``, experts ``{"w1": [E, H, F], ...}``."""
        with torch.no_grad():
            self.router.weight.copy_(router_weight)
        self.experts.load_full(experts)
