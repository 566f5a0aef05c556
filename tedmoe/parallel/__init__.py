"""Model-agnostic parallelism: the rank grid (``Topology``), collectives and their ledger,
tensor- and sequence-parallel pieces, activation checkpointing, sharding, launching."""

from tedmoe.parallel.topology import ParallelDims, Topology

__all__ = ["ParallelDims", "Topology"]
