"""Tensor-parallel causal self-attention with rotary positions.

Legend: B batch, T sequence, H hidden, N heads (N/n local), G kv heads, D head dim, n = tp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tedmoe.config import ModelConfig
from tedmoe.model.norm import RMSNorm
from tedmoe.parallel import comm
from tedmoe.parallel.ulysses import heads_to_seq, kv_replication, seq_to_heads
from tedmoe.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from tedmoe.parallel.topology import Topology


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[max_len, D/2]`` for rotary embeddings."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the last dim by each position's angle
    (``cos``/``sin`` broadcast against ``x``)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Attention(nn.Module):
    """Heads split over ``tp``: q, k, v column-parallel (one copy into the region), output
    row-parallel. With ``sp > 1`` (Ulysses) the input is this rank's chunk of every sequence:
    q, k, v are exchanged for a head shard of the full sequence around the attention kernel."""

    def __init__(self, config: ModelConfig, topology: Topology, device=None, dtype=None):
        super().__init__()
        tp, sp = topology.axis("tp"), topology.axis("sp")
        H, N, G = config.hidden_size, config.num_heads, config.kv_heads
        self.tp, self.sp, self.head_dim = tp, sp, config.head_size
        self.local_heads, self.local_kv_heads = N // tp.size, G // tp.size
        self.kv_repeat = kv_replication(self.local_kv_heads, sp.size)
        kw = {"device": device, "dtype": dtype, "bias": False, "copy_input": False}
        self.q = ColumnParallelLinear(H, N * self.head_dim, tp, **kw)
        self.k = ColumnParallelLinear(H, G * self.head_dim, tp, **kw)
        self.v = ColumnParallelLinear(H, G * self.head_dim, tp, **kw)
        self.o = RowParallelLinear(N * self.head_dim, H, tp, bias=False, device=device, dtype=dtype)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps, device=device, dtype=dtype)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps, device=device, dtype=dtype)
        cos, sin = rotary_tables(self.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x_BtH: torch.Tensor, kv=None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``positions`` ``[B, t]``: the tokens' places in their sequences when they are an ordered
        subset of them (random-LTD; the causal mask over the subset is then the original one)."""
        if kv is not None:
            return self._cached(x_BtH, *kv)
        B, t, _ = x_BtH.shape
        if positions is None:
            pos = self.sp.rank * t + torch.arange(t, device=x_BtH.device)  # global positions of this chunk
            cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)
        else:
            cos, sin = self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)  # [B, t, 1, D/2]
        x = comm.copy_to_region(x_BtH, self.tp)
        q = self.q(x).view(B, t, self.local_heads, self.head_dim)
        k = self.k(x).view(B, t, self.local_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):  # each rank normalises its own heads: the weights' gradients sum over tp
            q = self.q_norm(q, comm.copy_to_region(self.q_norm.weight, self.tp))
            k = self.k_norm(k, comm.copy_to_region(self.k_norm.weight, self.tp))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        v = self.v(x).view(B, t, self.local_kv_heads, self.head_dim)
        if self.kv_repeat > 1:
            k, v = k.repeat_interleave(self.kv_repeat, dim=2), v.repeat_interleave(self.kv_repeat, dim=2)
        q, k, v = (seq_to_heads(z, self.sp).transpose(1, 2) for z in (q, k, v))  # [B, heads, T, D]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
        y = heads_to_seq(y.transpose(1, 2), self.sp)  # [B, t, local heads, D]
        return self.o(y.reshape(B, t, -1))

    def _cached(self, x_1NH: torch.Tensor, batch, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """Inference over a ragged batch (``tedmoe.inference.kv_cache.RaggedBatch``): the N tokens of
        every sequence's chunk in one row, their keys and values written to the cache, each query
        attending to its sequence's cached tokens."""
        from tedmoe.inference.kv_cache import attend

        N = x_1NH.shape[1]
        cos, sin = self.cos[batch.positions].unsqueeze(1), self.sin[batch.positions].unsqueeze(1)
        x = comm.copy_to_region(x_1NH, self.tp)
        q = self.q(x).view(N, self.local_heads, self.head_dim)
        k = self.k(x).view(N, self.local_kv_heads, self.head_dim)
        v = self.v(x).view(N, self.local_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = attend(q, k, v.to(v_cache.dtype), k_cache, v_cache, batch)
        return self.o(y.reshape(1, N, -1))
