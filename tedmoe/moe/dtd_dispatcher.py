"""Duplicate token dropping (DTD) in the TED dispatcher: moving tokens to their experts and
back, by index, across ``ep`` and (with DTD) ``tp``.

The TP ranks of an expert-parallel group hold the same tokens; without DTD each sends all of
them through the all-to-all, so every row crosses the network ``tp`` times. With DTD each TP
rank sends only its ``1/tp`` share of every expert's slots and an all-gather over ``tp`` (on the
fast intra-node links) rebuilds the full expert input; the return path mirrors it with a
reduce-scatter. ``TEDDispatcher`` below does both, switched by ``dtd``.

Other places DTD touches: ``moe/dispatch_comm.py`` (the exact bytes of every step, for the tests
and the planner), ``parallel/comm.py`` (the collectives), ``config.MoEConfig.dtd`` (the switch).

Legend: S tokens, H hidden, E experts, K top-k, L = E / ep local experts, C capacity,
n = tp size, m = ep size, d = n with DTD else 1, c_e = ceil(rows of expert e / d).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tedmoe.moe.router import Routing
from tedmoe.parallel import comm
from tedmoe.parallel.topology import Topology


@dataclass
class DispatchPlan:
    """Index bookkeeping shared by ``dispatch`` and ``combine`` (identical on the TP ranks).

    A pair is *sent* when it was kept by the router and (under DTD) this TP rank owns its slot.
    R is the number of rows of this rank's send buffer.
    """

    row_SK: torch.Tensor  # send-buffer row of each pair (0 for pairs not sent)
    sent_SK: torch.Tensor  # 1.0 for the pairs sent, 0.0 for the others
    token_R: torch.Tensor  # token each send-buffer row copies (0 for empty rows)
    empty_R: torch.Tensor  # the rows no pair fills (zeros on the way out, ignored on the way back)
    pair_R: torch.Tensor  # flat (token * K + choice) pair index of each row (0 for empty rows)
    send_splits: list[int]
    recv_splits: list[int]
    dest: torch.Tensor | None  # dropless: received (gathered) row -> flat index into the [L * T] expert input
    rows_L: list[int] | None = None  # dropless: real rows of each local expert (the rest of T is padding)


class _GatherTokens(torch.autograd.Function):
    """Forward: the send buffer ``[R, H]``, row r a copy of token ``token_R[r]`` (empty rows zero).
    Backward: each token's gradient is the sum of its sent pairs' rows, one fused gather-and-sum
    (``embedding_bag`` over ``row_SK``; every row belongs to one pair, so nothing is scattered)."""

    @staticmethod
    def forward(ctx, x_SH, plan: DispatchPlan):
        ctx.plan = plan
        out = x_SH.index_select(0, plan.token_R)
        return out.index_fill_(0, plan.empty_R, 0) if len(plan.empty_R) else out

    @staticmethod
    def backward(ctx, grad_RH):
        plan = ctx.plan
        S, K = plan.row_SK.shape
        if grad_RH.shape[0] == 0:
            return grad_RH.new_zeros(S, grad_RH.shape[1]), None
        return F.embedding_bag(plan.row_SK, grad_RH, mode="sum", per_sample_weights=plan.sent_SK.to(grad_RH.dtype)), None


class _WeightedSum(torch.autograd.Function):
    """Forward: ``out[s] = sum_k gate[s, k] * y[row[s, k]]`` over the sent pairs (one fused
    ``embedding_bag``). Backward: one gather of the tokens' gradients onto the rows gives both
    ``y``'s gradient (times each row's gate) and the gates' (its dot product with the row)."""

    @staticmethod
    def forward(ctx, y_RH, gate_SK, plan: DispatchPlan):
        S, K = plan.row_SK.shape
        w_SK = gate_SK.detach().to(y_RH.dtype) * plan.sent_SK.to(y_RH.dtype)
        if y_RH.shape[0] == 0:
            out = y_RH.new_zeros(S, y_RH.shape[1])
        else:
            out = F.embedding_bag(plan.row_SK, y_RH, mode="sum", per_sample_weights=w_SK)
        gate_R = w_SK.reshape(-1).index_select(0, plan.pair_R)  # zero where the row is empty
        ctx.plan, ctx.gate_dtype = plan, gate_SK.dtype
        ctx.save_for_backward(y_RH, gate_R)
        return out

    @staticmethod
    def backward(ctx, grad_SH):
        y_RH, gate_R = ctx.saved_tensors
        plan = ctx.plan
        g_RH = grad_SH.index_select(0, plan.token_R)  # each row's token's gradient
        if y_RH.shape[0] == 0:
            grad_gate = plan.sent_SK.new_zeros(plan.row_SK.shape)
        else:  # each sent pair's dot product, gathered from its row (unsent pairs: 0)
            dot_R = (g_RH * y_RH).sum(1)
            grad_gate = dot_R.index_select(0, plan.row_SK.reshape(-1)).view_as(plan.sent_SK) * plan.sent_SK
        return g_RH.mul_(gate_R.unsqueeze(1)), grad_gate.to(ctx.gate_dtype), None


class TEDDispatcher:
    """Index-based dispatch / combine under tensor-expert-data parallelism.

    The send buffer holds, for every expert e in id order (so EP rank j's experts are
    contiguous), a segment of ``c_e`` rows: ``C`` slots with a capacity, the routed count in
    dropless mode. With DTD, TP rank t owns slots ``[t c_e, (t+1) c_e)`` of each expert (the
    segment is padded to ``d c_e`` when it does not divide) and sends only those.

    Forward communication steps:

    1. copy ``x`` into the dispatch path (backward: all-reduce ``[S, H]`` over tp, since each
       TP rank's tensor-parallel experts give a partial input gradient);
    2. dropless only: all-to-all over ep of the segment lengths (int64 ``[m, L]``);
    3. all-to-all over ep of the send buffer: ``sum_e c_e`` rows, ``m-1`` parts leave the rank;
    4. DTD: all-gather over tp rebuilds the full expert input (``n`` times the rows);
    5. (experts compute a partial sum over tp) DTD: reduce-scatter over tp back to this
       rank's rows; without DTD: all-reduce over tp of all rows;
    6. all-to-all over ep back to the sending ranks;
    7. DTD: weight owned pairs by their gates, all-reduce ``[S, H]`` over tp.

    Backward runs the reverse: 7 all-reduce of the ``[S K]`` fp32 gate gradient (DTD),
    6 all-to-all, 5 all-gather (DTD), 4 reduce-scatter (DTD), 3 all-to-all, 1 all-reduce.
    ``tedmoe.moe.dispatch_comm.capacity_comm`` states the exact calls and bytes; the tests hold
    the ledger to it.
    """

    def __init__(self, num_experts: int, top_k: int, topology: Topology, dtd: bool = True):
        self.num_experts, self.top_k = num_experts, top_k
        self.tp, self.ep = topology.axis("tp"), topology.axis("ep")
        self.dtd = dtd and self.tp.size > 1
        self.num_local = num_experts // self.ep.size

    def dispatch(self, x_SH: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, DispatchPlan]:
        """Return the expert input ``[L, T, H]`` (T padded to the busiest local expert)."""
        tp, ep, L, K = self.tp, self.ep, self.num_local, self.top_k
        d, t = (tp.size, tp.rank) if self.dtd else (1, 0)
        S, H = x_SH.shape
        if routing.capacity is None:
            rows_E = routing.tokens_per_expert_E
        else:
            rows_E = torch.full((self.num_experts,), routing.capacity, device=x_SH.device)
        seg_E = (rows_E + d - 1) // d
        slot_P, expert_P = routing.slot_SK.reshape(-1), routing.expert_SK.reshape(-1)
        seg_P = seg_E.clamp(min=1)[expert_P]
        sent_P = (slot_P >= 0) & (slot_P // seg_P == t)  # kept, and (DTD) this TP rank's slot
        row_P = torch.where(sent_P, (torch.cumsum(seg_E, 0) - seg_E)[expert_P] + slot_P % seg_P, 0)
        x_in = comm.copy_to_region(x_SH, tp)
        seg_mL = seg_E.view(ep.size, L)
        if routing.capacity is not None:  # every segment has ceil(C / d) rows: known on the host, no sync
            seg = -(-routing.capacity // d)
            recv_mL, send_splits = seg_mL, [L * seg] * ep.size
            recv_splits = send_splits
        else:
            recv_mL = comm.all_to_all(seg_mL, ep)
            send_splits, recv_splits = seg_mL.sum(1).tolist(), recv_mL.sum(1).tolist()
        pairs = sent_P.nonzero().squeeze(1)
        pair_R = torch.full((sum(send_splits),), -1, dtype=torch.long, device=x_SH.device)
        pair_R[row_P[pairs]] = pairs
        empty_R = (pair_R < 0).nonzero().squeeze(1)
        pair_R.clamp_(min=0)
        plan = DispatchPlan(row_P.view(S, K), sent_P.view(S, K).float(), pair_R // K, empty_R, pair_R,
                            send_splits, recv_splits, None)
        send = _GatherTokens.apply(x_in, plan)
        recv = comm.all_to_all_autograd(send, ep, send_splits, recv_splits)
        if self.dtd:
            recv = comm.gather_along(recv, tp, 0)  # rows ordered (tp rank, source, expert, slot)

        if routing.capacity is not None:  # equal segments: a transpose, a view when d * m == 1
            return recv.view(self._blocks(), L, -1, H).transpose(0, 1).reshape(L, -1, H), plan
        seg_len = recv_mL.reshape(-1).repeat(d)
        per_expert = seg_len.view(-1, L)
        start_in_expert = (torch.cumsum(per_expert, 0) - per_expert).reshape(-1)
        rows_L = per_expert.sum(0).tolist()  # one host sync (T needs it anyway)
        T = max(rows_L, default=0)
        plan.rows_L = rows_L
        seg_of_row = torch.repeat_interleave(torch.arange(len(seg_len), device=x_SH.device), seg_len)
        first_row = torch.cumsum(seg_len, 0) - seg_len
        pos = start_in_expert[seg_of_row] + torch.arange(len(seg_of_row), device=x_SH.device) - first_row[seg_of_row]
        dest = (seg_of_row % L) * T + pos
        plan.dest = dest
        return recv.new_zeros(L * T, H).index_copy(0, dest, recv).view(L, T, H), plan

    def _blocks(self) -> int:
        """Blocks of equal segments in the received rows: (tp rank if DTD) x (ep source)."""
        return (self.tp.size if self.dtd else 1) * self.ep.size

    def combine(self, y_LTH: torch.Tensor, routing: Routing, plan: DispatchPlan) -> torch.Tensor:
        """Reduce the experts' partial sums over tp, send them back, and weight by the gates."""
        tp, ep = self.tp, self.ep
        L, _, H = y_LTH.shape
        if plan.dest is None:  # capacity mode: undo the transpose of dispatch
            y = y_LTH.view(L, self._blocks(), -1, H).transpose(0, 1).reshape(-1, H)
        else:
            y = y_LTH.reshape(-1, H).index_select(0, plan.dest)
        y = comm.reduce_scatter_along(y, tp, 0) if self.dtd else comm.reduce_from_region(y, tp)
        back = comm.all_to_all_autograd(y, ep, plan.recv_splits, plan.send_splits)
        gates = routing.gate_SK
        if self.dtd:  # each TP rank combines only its pairs, so gate gradients are partial
            gates = comm.copy_to_region(gates, tp)
        out = _WeightedSum.apply(back, gates, plan)
        return comm.reduce_from_region(out, tp) if self.dtd else out
