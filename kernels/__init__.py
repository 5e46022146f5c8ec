"""Pallas kernels and the shared CCA visibility rule. Imports jax only."""
from kernels.visibility import visible_core_count, raw_window_start

__all__ = ["visible_core_count", "raw_window_start"]
