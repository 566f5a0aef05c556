"""DeepSpeed-Ulysses sequence parallelism: all-to-alls that trade a sequence shard for a head shard.

Legend: B batch, T full sequence, t = T/P local chunk, n heads on this rank before the exchange,
D head dim, P = sp size. Each SP rank holds ``t`` consecutive tokens of every sequence; attention
needs every token, so q, k and v go through ``seq_to_heads`` (scatter heads, gather sequence),
attention runs on ``n/P`` heads over the full sequence, and ``heads_to_seq`` brings the output back.
Both are ``all_to_all_autograd`` calls, so the backward is the reverse exchange.

Other places Ulysses touches: ``model/attention.py`` (calls the two exchanges around attention
and replicates GQA kv heads up to ``sp``), ``moe/router.py`` (the load-balancing loss sums its
counts over the SP group), ``runtime/trainer.py`` and ``runtime/engine.py`` (each rank takes its
chunk of every sequence; losses sum over ``dsp``), ``parallel/topology.py`` (the ``sp`` axis).
"""

from __future__ import annotations

import torch

from tedmoe.parallel import comm
from tedmoe.parallel.topology import Axis


def seq_to_heads(x_BtnD: torch.Tensor, axis: Axis) -> torch.Tensor:
    """``[B, t, n, D]`` (a chunk of the sequence, all local heads) -> ``[B, T, n/P, D]``."""
    P = axis.size
    if P == 1:
        return x_BtnD
    B, t, n, D = x_BtnD.shape
    if n % P:
        raise ValueError(f"{n} heads cannot be split over sp={P}; use a head count divisible by sp")
    x = x_BtnD.reshape(B, t, P, n // P, D).permute(2, 0, 1, 3, 4).reshape(P * B * t, (n // P) * D)
    y = comm.all_to_all_autograd(x, axis)  # chunk j (heads j) goes to rank j; rank j's tokens come back
    return y.reshape(P, B, t, n // P, D).permute(1, 0, 2, 3, 4).reshape(B, P * t, n // P, D)


def heads_to_seq(x_BThD: torch.Tensor, axis: Axis) -> torch.Tensor:
    """``[B, T, h, D]`` (all tokens, this rank's heads) -> ``[B, t, h P, D]``; inverse of ``seq_to_heads``."""
    P = axis.size
    if P == 1:
        return x_BThD
    B, T, h, D = x_BThD.shape
    t = T // P
    x = x_BThD.reshape(B, P, t, h, D).permute(1, 0, 2, 3, 4).reshape(P * B * t, h * D)
    y = comm.all_to_all_autograd(x, axis)  # sequence chunk j goes back to rank j; heads come from rank j
    return y.reshape(P, B, t, h, D).permute(1, 2, 0, 3, 4).reshape(B, t, P * h, D)


def kv_replication(kv_heads: int, sp: int) -> int:
    """How many times each local kv head is repeated so the heads split evenly over ``sp``
    (grouped-query attention with fewer kv heads than SP ranks)."""
    if kv_heads % sp == 0:
        return 1
    if sp % kv_heads == 0:
        return sp // kv_heads
    raise ValueError(f"{kv_heads} kv heads per TP rank cannot be spread over sp={sp}: "
                     "make one a multiple of the other")
