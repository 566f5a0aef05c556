"""Top-k router with capacity, drop policies, dropless mode, noise, aux and z losses.

Legend: S tokens, H hidden, E experts, K top-k, C capacity.
The router is replicated on the TP ranks of a group; its decisions are identical there
because its input and its draws are. Every draw is a pure function of the token's global id
(``tedmoe.moe.noise``), so random routing gives the single-process result in every layout.

Load-balancing loss ``E * sum_e f_e * P_e`` (1.0 for uniform routing), with ``P_e`` the mean
router probability of expert e and ``f_e`` the fraction of routed assignments to it, counted
before capacity drops: ``aux_loss_type = "all_choices"`` counts all K choices of every token
(``f_e = count_e / (S K)``); ``"switch"`` counts first choices only (``f_e = first_e / S``), as
the Switch Transformer and DeepSpeed's top-1 and top-2 gates do. Both equal for K = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tedmoe.config import MoEConfig
from tedmoe.moe import noise
from tedmoe.parallel import comm
from tedmoe.parallel.sharding import mark
from tedmoe.parallel.topology import Axis


@dataclass
class Routing:
    """Where each (token, choice) pair goes. Pairs with ``slot_SK == -1`` were dropped."""

    expert_SK: torch.Tensor
    """Global expert id of each pair (int64)."""
    gate_SK: torch.Tensor
    """Combine weight of each pair (fp32, differentiable w.r.t. the router)."""
    slot_SK: torch.Tensor
    """Position of the pair inside its expert's buffer (int64), -1 if dropped."""
    capacity: int | None
    """Slots per expert, or ``None`` in dropless mode."""
    tokens_per_expert_E: torch.Tensor
    """Kept pairs per expert (int64)."""
    num_dropped: torch.Tensor
    """Dropped pairs (int64 scalar)."""
    aux_loss: torch.Tensor
    """Load-balancing loss ``E * sum_e f_e * P_e`` (1.0 for uniform routing)."""
    z_loss: torch.Tensor
    """Router z-loss ``mean_s logsumexp(logits_s)^2``."""


def _priority_rank(key: torch.Tensor) -> torch.Tensor:
    """Rank of each element when sorted ascending (ties by index)."""
    order = torch.argsort(key, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=key.device)
    return rank


def assign_slots(expert_P: torch.Tensor, priority_P: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot of each pair inside its expert, in ascending ``priority`` order, by one sort.

    Returns ``(slot_P, count_E)``. ``O(P log P)``; no ``[P, E]`` one-hot.
    """
    num = len(expert_P)
    order = torch.argsort(expert_P * num + _priority_rank(priority_P), stable=True)
    count_E = torch.bincount(expert_P, minlength=num_experts)
    start_E = torch.cumsum(count_E, 0) - count_E
    slot = torch.empty_like(expert_P)
    slot[order] = torch.arange(num, device=expert_P.device) - start_E[expert_P[order]]
    return slot, count_E


class Router(nn.Module):
    """Bias-free linear gate computed in fp32, then top-k and capacity."""

    def __init__(self, hidden_size: int, config: MoEConfig, device=None, dtype=None, sp: Axis | None = None,
                 layer: int = 0):
        super().__init__()
        self.config, self.sp, self.layer = config, sp, layer
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=hidden_size ** -0.5)
        mark(self.weight)  # replicated on every rank of a TP group

    def draws(self, stream: int, step: int, token_S: torch.Tensor, width: int) -> torch.Tensor:
        """This layer's ``[S, width]`` uniforms of one kind for tokens with global ids ``token_S``."""
        return noise.uniform(self.config.router_seed, self.layer, stream, step, token_S, width)

    def forward(self, x_SH: torch.Tensor, token_S: torch.Tensor | None = None, step: int = 0) -> Routing:
        """Route ``S`` tokens; ``token_S`` are their global ids and ``step`` the optimizer step,
        which key the random draws (needed only for jitter, Gumbel noise or random selection)."""
        cfg, (S, _), E, K = self.config, x_SH.shape, self.config.num_experts, self.config.top_k
        x = x_SH.float()
        if token_S is None:
            token_S = torch.arange(S, device=x.device)
        if self.training and cfg.router_jitter > 0:
            u = self.draws(noise.JITTER, step, token_S, x.shape[1])
            x = x * (1 - cfg.router_jitter + 2 * cfg.router_jitter * u)
        logits_SE = F.linear(x, self.weight.float())
        probs_SE = logits_SE.softmax(dim=-1)
        scores = probs_SE
        if self.training and cfg.gumbel_noise:
            u = self.draws(noise.GUMBEL, step, token_S, E).clamp_(1e-9, 1 - 1e-9)
            scores = logits_SE.detach() - torch.log(-torch.log(u))
        expert_SK = torch.topk(scores.detach(), K, dim=-1).indices
        gate_SK = probs_SE.gather(-1, expert_SK)
        if K > 1 and cfg.normalize_gates:
            gate_SK = gate_SK / gate_SK.sum(dim=-1, keepdim=True)

        # Pairs are numbered choice-major (all first choices, then all second choices...).
        expert_P = expert_SK.t().reshape(-1)
        if cfg.dropless or cfg.drop_policy == "position":
            priority = torch.arange(S * K, device=x.device)
        elif cfg.drop_policy == "probs":
            priority = -gate_SK.detach().t().reshape(-1)
        else:  # random token selection: a random priority per (token, choice)
            priority = self.draws(noise.SELECTION, step, token_S, K).t().reshape(-1)
        slot_P, routed_E = assign_slots(expert_P, priority, E)
        capacity = None if cfg.dropless else cfg.capacity(S, self.training)
        if capacity is not None:
            slot_P = slot_P.masked_fill(slot_P >= capacity, -1)
        slot_SK = slot_P.view(K, S).t().contiguous()
        kept_E = routed_E if capacity is None else routed_E.clamp(max=capacity)

        # Under sequence parallelism the losses are over the whole sequence: the routed fractions
        # f_e are counted over every SP rank (no gradient flows through them) and the probability
        # and z terms are this rank's share, so the SP ranks' losses sum to the full-sequence loss.
        if cfg.aux_loss_type == "switch":
            counted_E, per_token = torch.bincount(expert_SK[:, 0], minlength=E), 1
        else:
            counted_E, per_token = routed_E, K
        S_all = S
        if self.sp is not None and self.sp.size > 1:
            counted_E, S_all = comm.all_reduce(counted_E, self.sp), S * self.sp.size
        aux = E * torch.sum(counted_E.float() / (S_all * per_token) * probs_SE.sum(dim=0) / S_all)
        z = torch.logsumexp(logits_SE, dim=-1).square().sum() / S_all
        return Routing(expert_SK, gate_SK, slot_SK, capacity, kept_E, (slot_P < 0).sum(), aux, z)
