"""Router randomness as a pure function of what a token *is*, not of which rank holds it.

Every random number the router draws (input jitter, Gumbel noise, random token selection) is
``uniform(seed, layer, stream, step, token, column)``: a counter-based hash of the router seed,
the layer index, the kind of draw, the optimizer step, the token's global id and a column
(hidden unit, expert or choice). A token's global id is ``sequence * sequence_length +
position`` with the sequence's index in the step's global batch and its position in the whole
sequence, so a token gets the same draws whichever data-, sequence-, tensor- or expert-parallel
rank processes it: every layout gives the single-process result, and no two ranks share noise.
A checkpoint recompute draws the same numbers again; a resume continues them from the step.

The hash is ``lowbias32`` (an integer finaliser with full avalanche) applied after xoring in each
coordinate; 24 bits of it make a float in ``[0, 1)``. Pure tensor arithmetic: any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

JITTER, GUMBEL, SELECTION = 1, 2, 3
_M32 = 0xFFFFFFFF


def _mix(x):
    """lowbias32 on non-negative values below 2**32 (Python ints or int64 tensors)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


@dataclass
class TokenContext:
    """Which tokens a forward processes, for the router's draws. The engine sets it before each
    micro-batch; a layer used on its own counts its forwards as steps."""

    step: int = 0
    """Optimizer step (0-based) the forward belongs to."""
    first_sequence: int = 0
    """Index, in the step's global batch, of this micro-batch's first sequence."""
    first_position: int = 0
    """Position of this rank's first token in the sequence (``sp`` rank x local length)."""
    sequence_length: int | None = None
    """Tokens in a whole sequence (local length x ``sp``); ``None``: the local length."""

    def token_ids(self, batch: int, length: int, device=None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Global ids ``[batch * length]`` of a ``[batch, length]`` block of tokens; ``positions``
        ``[batch, length]``: their places in the whole sequence (a subset of it, random-LTD),
        else this rank's consecutive chunk."""
        full = self.sequence_length or length
        seq = torch.arange(batch, device=device) + self.first_sequence
        pos = torch.arange(length, device=device)[None, :] + self.first_position if positions is None else positions
        if self.sequence_length is None and positions is not None:
            raise ValueError("token positions need the whole sequence's length in the token context")
        return (seq[:, None] * full + pos).reshape(-1)


def uniform(seed: int, layer: int, stream: int, step: int, token_S: torch.Tensor, width: int) -> torch.Tensor:
    """``[S, width]`` floats in ``[0, 1)``, a pure function of every argument (see the module doc)."""
    base = _mix(_mix(_mix(_mix(seed & _M32) ^ (layer & _M32)) ^ stream) ^ (step & _M32))
    h = _mix((token_S & _M32) ^ base)
    h = _mix(h ^ ((token_S >> 32) & _M32))
    cols = torch.arange(width, device=token_S.device)
    h = _mix(_mix(h[:, None] ^ cols[None, :]) ^ base)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))
