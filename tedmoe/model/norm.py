"""RMSNorm, computed in fp32 whatever the activations' dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tedmoe.parallel.sharding import mark


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim. ``forward(x, weight)`` may pass the weight in a
    different form (e.g. through a region boundary whose backward reduces its gradient)."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        mark(self.weight)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight if weight is None else weight
        return F.rms_norm(x.float(), w.shape, w.float(), self.eps).to(x.dtype)
