"""Pallas kernels and the shared CCA visibility rule. Imports jax only."""
from cca_kernels.visibility import visible_core_count, raw_window_start

__all__ = ["visible_core_count", "raw_window_start", "cca_attention_pallas", "BlockSizes"]


def __getattr__(name):
    # The Pallas kernels are imported on first use, so that `cca_kernels.visibility` (imported by
    # every implementation) does not pull in jax.experimental.pallas.
    if name in ("cca_attention_pallas", "BlockSizes"):
        from cca_kernels import cca_attention
        return getattr(cca_attention, name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
