"""Mixture-of-Experts: ``MoE`` (router + TED dispatcher + grouped tensor-parallel experts)."""

from tedmoe.moe.layer import MoE, MoEStats

__all__ = ["MoE", "MoEStats"]
