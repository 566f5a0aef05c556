"""Ulysses sequence parallelism vs a Megatron-style sequence-parallel baseline, per attention layer.

Reproduce:  .venv/bin/python benchmarks/sequence_parallel.py        (starts its 8 CPU ranks itself)

For P = 2, 4, 8 with the sequence growing with P (T = 512 P): bytes each rank sends in one
forward + backward, from the communication ledger, of the attention block and of a whole
transformer layer. Ulysses: all-to-alls of q, k, v and the output; its MLP is local. Baseline:
all-gather the sequence, heads (and the MLP) split over the same P ranks, reduce-scatter back to
sequence chunks, around attention and around the MLP. Then, at a
fixed T = 4096, the activation memory one attention layer saves for backward per rank (exact
count of saved tensors). Prints tables on rank 0, writes benchmarks/results/sequence_parallel-<date>.json
(benchmarks/report.py makes it a dated report).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tedmoe.config import ModelConfig
from tedmoe.model.attention import Attention, apply_rotary
from tedmoe.parallel import comm, launch
from tedmoe.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from tedmoe.parallel.topology import Topology

import common

H, HEADS, B = 256, 8, 1


class MegatronSPAttention(nn.Module):
    """All-gather the sequence over ``sp``, attention with heads split over the same ranks,
    reduce-scatter the output back into sequence chunks."""

    def __init__(self, cfg: ModelConfig, topo: Topology):
        super().__init__()
        sp = self.sp = topo.axis("sp")
        self.heads, self.d = HEADS // sp.size, H // HEADS
        self.q, self.k, self.v = (ColumnParallelLinear(H, H, sp, bias=False, copy_input=False) for _ in range(3))
        self.o = RowParallelLinear(H, H, sp, bias=False, reduce_output=False)
        ref = Attention(cfg, Topology.single())
        self.cos, self.sin = ref.cos, ref.sin

    def forward(self, x_BtH):
        x = comm.gather_along(x_BtH, self.sp, 1)  # [B, T, H]; backward reduce-scatters
        T = x.shape[1]
        cos, sin = self.cos[:T].unsqueeze(1), self.sin[:T].unsqueeze(1)
        q, k, v = (f(x).view(B, T, self.heads, self.d) for f in (self.q, self.k, self.v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        y = self.o(y.transpose(1, 2).reshape(B, T, -1))
        return comm.reduce_scatter_along(y, self.sp, 1)


class MegatronSPMLP(nn.Module):
    """The baseline's MLP: all-gather the sequence, column/row-parallel MLP over the same ranks,
    reduce-scatter back. (Ulysses runs the MLP on its chunk with no communication.)"""

    def __init__(self, topo: Topology):
        super().__init__()
        self.sp = topo.axis("sp")
        self.fc1 = ColumnParallelLinear(H, 4 * H, self.sp, copy_input=False)
        self.fc2 = RowParallelLinear(4 * H, H, self.sp, bias=False, reduce_output=False)

    def forward(self, x_BtH):
        x = comm.gather_along(x_BtH, self.sp, 1)
        return comm.reduce_scatter_along(self.fc2(F.gelu(self.fc1(x))), self.sp, 1)


def sent(layer, x) -> int:
    x = x.clone().requires_grad_(True)
    with comm.LEDGER.capture():
        layer(x).sum().backward()
    return comm.LEDGER.total().bytes


def saved_bytes(layer, x) -> int:
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x.clone().requires_grad_(True))
    return sum(seen.values())


def main() -> int:
    if not launch.launched():
        return common.start_ranks(8)
    launch.init_distributed()
    rows, memory = [], []
    for P in (2, 4, 8):
        T = 512 * P
        cfg = ModelConfig(vocab_size=64, hidden_size=H, num_layers=1, num_heads=HEADS, max_seq_len=T)
        topo = Topology(8, sp=P)
        x = torch.randn(B, T // P, H)
        rows.append({"P": P, "seq_len": T, "ulysses_bytes": sent(Attention(cfg, topo), x),
                     "megatron_sp_bytes": sent(MegatronSPAttention(cfg, topo), x),
                     "megatron_sp_mlp_bytes": sent(MegatronSPMLP(topo), x)})
    T = 4096
    cfg = ModelConfig(vocab_size=64, hidden_size=H, num_layers=1, num_heads=HEADS, max_seq_len=T)
    for P in (1, 2, 4, 8):
        topo = Topology(8, sp=P) if P > 1 else Topology.single()
        memory.append({"P": P, "seq_len": T, "saved_bytes": saved_bytes(Attention(cfg, topo), torch.randn(B, T // P, H))})
    if dist.get_rank() == 0:
        print(f"H={H}, {HEADS} heads, batch {B}, fp32; MB sent per rank, forward + backward. A transformer layer is "
              "attention + MLP: Ulysses' MLP needs no communication, Megatron-SP gathers and scatters around it too.")
        print(f"{'P':>3} {'seq':>6} {'Ulysses attn':>13} {'Meg-SP attn':>12} {'ratio':>6} "
              f"{'Meg-SP layer':>13} {'layer ratio':>12}")
        for r in rows:
            r["ratio_attention"] = r["megatron_sp_bytes"] / r["ulysses_bytes"]
            r["ratio_layer"] = (r["megatron_sp_bytes"] + r["megatron_sp_mlp_bytes"]) / r["ulysses_bytes"]
            print(f"{r['P']:>3} {r['seq_len']:>6} {r['ulysses_bytes'] / 2**20:>13.2f} "
                  f"{r['megatron_sp_bytes'] / 2**20:>12.2f} {r['ratio_attention']:>6.2f} "
                  f"{(r['megatron_sp_bytes'] + r['megatron_sp_mlp_bytes']) / 2**20:>13.2f} {r['ratio_layer']:>12.2f}")
        print(f"\nactivations saved for backward per rank, T={T}")
        print(f"{'P':>3} {'MB':>8} {'x P / (P=1)':>12}")
        for m in memory:
            m["relative_times_P"] = m["saved_bytes"] * m["P"] / memory[0]["saved_bytes"]
            print(f"{m['P']:>3} {m['saved_bytes'] / 2**20:>8.2f} {m['relative_times_P']:>12.2f}")
        config = {"hidden": H, "heads": HEADS, "batch": B, "ranks": 8, "P": [r["P"] for r in rows],
                  "seq_len_per_P": 512, "memory_seq_len": T}
        common.write_result("sequence_parallel", config, {"bytes": rows, "activations": memory})
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
