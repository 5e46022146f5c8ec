"""The CCA visibility rule (docs/cca.md §2), written once for every implementation.

Query position `m` sees the first `c(m) = max(0, floor((m + 1 - w) / g))` core tokens and the
raw keys `c(m) * g .. m`. The reference, the blocked XLA path, the kernels' masks and the
decode cache all call these two functions, so the rule has a single source of truth.
Both accept Python ints or integer jax/numpy arrays.
"""
from __future__ import annotations

import jax.numpy as jnp


def visible_core_count(position, group_size: int, window_size: int):
    """Number of core tokens visible to the query at `position`: max(0, (m+1-w) // g)."""
    if isinstance(position, int):
        return max(0, (position + 1 - window_size) // group_size)
    return jnp.maximum(0, (position + 1 - window_size) // group_size)


def raw_window_start(position, group_size: int, window_size: int):
    """First raw (uncompressed) key position visible to the query at `position`."""
    return visible_core_count(position, group_size, window_size) * group_size
