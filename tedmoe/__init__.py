"""tedmoe: Mixture-of-Experts training with hybrid tensor, expert and data parallelism."""

__version__ = "0.1.0"
