"""A tensor-parallel toy language model on every TP degree the world allows, checked against
one process: loss and every gradient, plus the communication ledger of one step.

Legend: B batch, T tokens per sequence, V vocabulary, H hidden, F ffn.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tedmoe.config import MoEConfig
from tedmoe.moe.layer import MoE
from tedmoe.parallel import comm
from tedmoe.parallel.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                             vocab_parallel_cross_entropy)
from tedmoe.parallel.topology import Topology

V, H, F_DIM, B, T = 64, 32, 128, 8, 16


class FullModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc1, self.fc2, self.head = nn.Embedding(V, H), nn.Linear(H, F_DIM), nn.Linear(F_DIM, H), nn.Linear(H, V, bias=False)

    def forward(self, ids, targets):
        h = self.emb(ids)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return F.cross_entropy(self.head(h).flatten(0, 1), targets.flatten())


class TPModel(nn.Module):
    def __init__(self, full: FullModel, axis):
        super().__init__()
        self.axis = axis
        self.emb = VocabParallelEmbedding.from_full(full.emb, axis)
        self.fc1 = ColumnParallelLinear.from_full(full.fc1, axis)
        self.fc2 = RowParallelLinear.from_full(full.fc2, axis)
        self.head = ColumnParallelLinear.from_full(full.head, axis)  # logits stay vocab-sharded

    def forward(self, ids, targets):
        h = self.emb(ids)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return vocab_parallel_cross_entropy(self.head(h).flatten(0, 1), targets.flatten(), self.axis).mean()

    def full_grads(self):
        return {"emb.weight": self.emb.full_weight(self.emb.weight.grad),
                "fc1.weight": self.fc1.full_weight(self.fc1.weight.grad), "fc1.bias": self.fc1.full_bias(self.fc1.bias.grad),
                "fc2.weight": self.fc2.full_weight(self.fc2.weight.grad), "fc2.bias": self.fc2.bias.grad,
                "head.weight": self.head.full_weight(self.head.weight.grad)}


def check_layout(world_size: int, tp: int) -> tuple[float, float, float, str]:
    """(parallel loss, reference loss, max relative grad error over all ranks, ledger table)."""
    topo = Topology(world_size, tp=tp)
    dp = topo.axis("dp")
    torch.manual_seed(0)
    full = FullModel()
    ids = torch.randint(0, V, (B * dp.size, T + 1)).chunk(dp.size)[dp.rank]
    inputs, targets = ids[:, :-1], ids[:, 1:]
    model = TPModel(full, topo.axis("tp"))
    with comm.LEDGER.capture():
        loss = model(inputs, targets)
        loss.backward()
    table = comm.LEDGER.table()
    ref = full(inputs, targets)
    ref.backward()
    ref_grads = dict(full.named_parameters())
    err = max(((g - ref_grads[k].grad).abs().max() / ref_grads[k].grad.abs().max()).item()
              for k, g in model.full_grads().items())
    stats = torch.tensor([abs(loss.item() - ref.item()), err])
    if world_size > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    return loss.item(), ref.item(), stats[1].item(), table


def check_moe(world_size: int, tp: int, ep: int, dtd: bool) -> tuple[float, str, int]:
    """TED MoE layer vs one process on this rank's shard:
    (max relative error over all ranks, ledger table, all-to-all bytes sent by this rank)."""
    topo = Topology(world_size, tp=tp, ep=ep)
    cfg = MoEConfig(ffn_hidden_size=F_DIM, num_experts=8, top_k=2, dtd=dtd)
    torch.manual_seed(0)
    ref = MoE(H, cfg, Topology.single())  # one process: its collectives are identities, nothing is recorded
    layer = MoE(H, cfg, topo)
    layer.load_full(ref.router.weight.detach(), ref.experts.full_tensors())
    x = torch.randn(topo.size("dp"), B * T, H)[topo.coord("dp")]
    outs = []
    with comm.LEDGER.capture():
        for m in (layer, ref):
            xg = x.clone().requires_grad_(True)
            y, stats = m(xg)
            (y.square().sum() + stats.aux_loss).backward()
            outs.append((y.detach(), xg.grad))
    err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*outs))
    stats = torch.tensor([err])
    if world_size > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    return stats.item(), comm.LEDGER.table(), comm.LEDGER.total(kind="all_to_all").bytes


def main() -> int:
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    worst = 0.0
    for tp in [d for d in (1, 2, 4, 8) if world % d == 0]:
        loss, ref, err, table = check_layout(world, tp)
        worst = max(worst, err)
        if rank == 0:
            print(f"\n== world {world}: TP {tp} x DP {world // tp} ==")
            print(f"rank 0 shard: loss {loss:.6f}, single-process {ref:.6f}; max relative gradient error {err:.2e}")
            print("communication of one forward + backward (rank 0):")
            print(table)
    for tp in [d for d in (2, 1, 4) if world % d == 0]:
        ep = max(d for d in (1, 2, 4, 8) if (world // tp) % d == 0 and 8 % d == 0)
        a2a = {}
        for dtd in (True, False):
            err, table, a2a[dtd] = check_moe(world, tp, ep, dtd)
            worst = max(worst, err)
            if rank == 0 and dtd:
                print(f"\n== TED MoE layer (8 experts, top-2), TP {tp} x EP {ep} x DP {world // tp}, DTD on ==")
                print(f"rank 0 shard: output and input gradient vs single process, max relative error {err:.2e}")
                print(table)
        if rank == 0 and ep > 1 and tp > 1:
            print(f"all-to-all bytes per rank: {a2a[True]:,} with DTD, {a2a[False]:,} without "
                  f"({a2a[False] / max(a2a[True], 1):.1f}x less with DTD; TP = {tp})")
    if rank == 0:
        verdict = "match" if worst < 1e-5 else "DO NOT match"
        print(f"\nevery layout and the single-process model {verdict} (worst relative gradient error {worst:.2e})")
    return 0 if worst < 1e-5 else 1
