"""Typed configuration. Every field has a docstring; ``validate`` raises ``ValueError`` naming the fix."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

DropPolicy = Literal["position", "probs", "random"]


@dataclass
class MoEConfig:
    """One Mixture-of-Experts layer."""

    hidden_size: int = 64
    """Model width H (input and output of every expert)."""
    ffn_hidden_size: int = 256
    """Hidden width F of each expert MLP; split over ``tp``."""
    num_experts: int = 8
    """Experts E in the layer; split ``E / ep`` per expert-parallel rank."""
    top_k: int = 2
    """Experts each token is sent to."""
    capacity_factor: float = 1.0
    """Training capacity per expert is ``ceil(top_k * capacity_factor * S / E)`` tokens."""
    eval_capacity_factor: float | None = None
    """Capacity factor in eval mode; ``None`` uses ``capacity_factor``."""
    min_capacity: int = 4
    """Lower bound on the capacity of each expert."""
    drop_policy: DropPolicy = "position"
    """Who keeps a slot when an expert overflows: ``position`` (first choices first, then token
    order), ``probs`` (highest router probability) or ``random`` (random token selection)."""
    dropless: bool = False
    """Compute every routed token: no capacity, uneven all-to-all."""
    normalize_gates: bool = True
    """For ``top_k > 1``, renormalise the chosen experts' probabilities to sum to 1."""
    router_jitter: float = 0.0
    """Multiply the router's input by ``U(1 - jitter, 1 + jitter)`` in training (0 disables)."""
    gumbel_noise: bool = False
    """Top-1 only: pick the expert from logits plus Gumbel noise in training (gates stay clean)."""
    router_seed: int = 1234
    """Seed of the router's noise and random token selection (the same on every rank)."""
    activation: Literal["gelu", "swiglu"] = "gelu"
    """Expert MLP activation."""
    dtd: bool = True
    """Duplicate token dropping: each TP rank sends 1/TP of the dispatch buffer."""

    def capacity(self, num_tokens: int, training: bool = True) -> int:
        cf = self.capacity_factor if training or self.eval_capacity_factor is None else self.eval_capacity_factor
        return max(self.min_capacity, math.ceil(self.top_k * cf * num_tokens / self.num_experts))

    def validate(self, tp: int = 1, ep: int = 1) -> None:
        """Raise ``ValueError`` for a setting that cannot work with these degrees."""
        if self.num_experts < 1 or self.top_k < 1:
            raise ValueError(f"num_experts={self.num_experts} and top_k={self.top_k} must be at least 1")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}; "
                             f"set top_k <= {self.num_experts} or add experts")
        if self.num_experts % ep:
            raise ValueError(f"num_experts={self.num_experts} is not divisible by ep={ep}; "
                             f"make num_experts a multiple of {ep} or pick ep from the divisors of {self.num_experts}")
        if self.ffn_hidden_size % tp:
            raise ValueError(f"ffn_hidden_size={self.ffn_hidden_size} is not divisible by tp={tp}; "
                             f"make it a multiple of {tp} (e.g. {math.ceil(self.ffn_hidden_size / tp) * tp})")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name}={value} must be > 0 (1.0 gives each expert its even share; "
                                 "or set dropless=true for no capacity)")
        if self.min_capacity < 0:
            raise ValueError(f"min_capacity={self.min_capacity} must be >= 0")
        if self.drop_policy not in ("position", "probs", "random"):
            raise ValueError(f"drop_policy={self.drop_policy!r} is not one of 'position', 'probs', 'random'")
        if self.activation not in ("gelu", "swiglu"):
            raise ValueError(f"activation={self.activation!r} is not one of 'gelu', 'swiglu'")
        if not 0 <= self.router_jitter < 1:
            raise ValueError(f"router_jitter={self.router_jitter} must be in [0, 1)")
        if self.gumbel_noise and self.top_k != 1:
            raise ValueError("gumbel_noise applies to top-1 routing only; set top_k=1 or gumbel_noise=false")

