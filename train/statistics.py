"""Intervals for the quality comparison: Wilson intervals of one accuracy, and paired
bootstrap intervals of a difference between two models evaluated on the same examples.

Paired: both models answered the same examples (same seed) and scored the same perplexity
windows, so the bootstrap resamples examples (or windows) once and applies the resample to
both, which keeps the correlation between them out of the interval's width.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

Z95 = 1.959964
BOOTSTRAP_SAMPLES = 4000


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion, in percent."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)   # exact at the ends
    return (100 * low, 100 * high)


def paired_bootstrap(columns: Sequence[np.ndarray],
                     statistic: Callable[..., float], *, samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = 0) -> tuple[float, float, float]:
    """(statistic on the data, 2.5% and 97.5% percentiles over resamples of its rows).

    columns: arrays of equal length n, row i of each belonging to the same example; every
    resample draws n row indices with replacement and passes each column, so indexed, to
    `statistic`.
    """
    columns = [np.asarray(c, np.float64) for c in columns]
    n = len(columns[0])
    if n == 0 or any(len(c) != n for c in columns):
        raise ValueError(f"paired columns must be non-empty and of one length, got "
                         f"{[len(c) for c in columns]}")
    rng = np.random.default_rng(seed)
    values = np.empty(samples)
    for s in range(samples):
        rows = rng.integers(0, n, n)
        values[s] = statistic(*(c[rows] for c in columns))
    low, high = np.percentile(values, [2.5, 97.5])
    return float(statistic(*columns)), float(low), float(high)


def accuracy_difference(ours: Sequence[bool], control: Sequence[bool], **options
                        ) -> tuple[float, float, float]:
    """Percentage points ours minus control, with a paired bootstrap 95% interval."""
    return paired_bootstrap([ours, control], lambda a, b: 100 * (a.mean() - b.mean()),
                            **options)


def perplexity_ratio(ours_nll: Sequence[float], control_nll: Sequence[float], tokens: int,
                     **options) -> tuple[float, float, float]:
    """Percent by which our perplexity exceeds the control's, from per-window summed NLL
    over `tokens` tokens each, with a paired bootstrap 95% interval over windows."""
    def excess(a, b):
        return 100 * (math.exp((a.sum() - b.sum()) / (tokens * len(a))) - 1)
    return paired_bootstrap([ours_nll, control_nll], excess, **options)


def ratio_difference(ours_hits, ours_counts, control_hits, control_counts, **options
                     ) -> tuple[float, float, float]:
    """Percentage points of hits/counts, ours minus control, paired over windows."""
    def difference(a, n_a, b, n_b):
        return 100 * (a.sum() / max(n_a.sum(), 1) - b.sum() / max(n_b.sum(), 1))
    return paired_bootstrap([ours_hits, ours_counts, control_hits, control_counts],
                            difference, **options)
