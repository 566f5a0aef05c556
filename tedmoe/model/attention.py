"""Tensor-parallel causal self-attention with rotary positions.

Legend: B batch, T sequence, H hidden, N heads (N/n local), G kv heads, D head dim, n = tp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tedmoe.config import ModelConfig
from tedmoe.parallel import comm
from tedmoe.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from tedmoe.parallel.topology import Topology


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[max_len, D/2]`` for rotary embeddings."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x_BNTD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dim by each position's angle."""
    x1, x2 = x_BNTD.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos_TD - x2 * sin_TD, x1 * sin_TD + x2 * cos_TD], dim=-1)
    return out.to(x_BNTD.dtype)


class Attention(nn.Module):
    """Heads split over ``tp``: q, k, v column-parallel (one copy into the region), output row-parallel."""

    def __init__(self, config: ModelConfig, topology: Topology, device=None, dtype=None):
        super().__init__()
        tp = topology.axis("tp")
        H, N, G = config.hidden_size, config.num_heads, config.kv_heads
        self.tp, self.head_dim = tp, H // N
        self.local_heads, self.local_kv_heads = N // tp.size, G // tp.size
        kw = {"device": device, "dtype": dtype, "bias": False, "copy_input": False}
        self.q = ColumnParallelLinear(H, N * self.head_dim, tp, **kw)
        self.k = ColumnParallelLinear(H, G * self.head_dim, tp, **kw)
        self.v = ColumnParallelLinear(H, G * self.head_dim, tp, **kw)
        self.o = RowParallelLinear(N * self.head_dim, H, tp, bias=False, device=device, dtype=dtype)
        cos, sin = rotary_tables(self.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x_BTH: torch.Tensor, positions_T: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x_BTH.shape
        pos = torch.arange(T, device=x_BTH.device) if positions_T is None else positions_T
        cos, sin = self.cos[pos], self.sin[pos]
        x = comm.copy_to_region(x_BTH, self.tp)
        q = self.q(x).view(B, T, self.local_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, T, self.local_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, self.local_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=self.local_kv_heads != self.local_heads)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))
