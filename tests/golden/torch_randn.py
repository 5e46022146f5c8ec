"""PyTorch's CPU `torch.manual_seed(s); torch.randn(..., dtype=torch.float64)`, in NumPy.

The golden inputs (q, k, v and the cotangent) were drawn that way by the script that ran the
authors' code. Re-drawing them here lets the repository store only the outputs and gradients
(half the bytes) and lets the golden tests run where PyTorch is not installed. `cases.json`
pins the sha256 of every re-drawn array, and `tests/cca_jax/test_golden_inputs.py` checks this
generator against PyTorch itself where PyTorch is installed.

How PyTorch draws float64 normals on the CPU (ATen's `normal_fill`): a Mersenne Twister
(mt19937, seeded like NumPy's legacy `RandomState(seed)`) gives 53-bit uniforms, two 32-bit
words each (the first word high); every run of 16 uniforms becomes 16 normals by Box-Muller on
the pairs (j, j + 8); when the count is not a multiple of 16, the last 16 values are drawn
again and transformed again. libm's log/cos/sin (Python's `math`) match PyTorch bit for bit.
"""
from __future__ import annotations

import math

import numpy as np


def _uniform53(state: np.random.RandomState, n: int) -> np.ndarray:
    words = state.randint(0, 2**32, size=2 * n, dtype=np.uint64).reshape(n, 2)
    bits = (words[:, 0] << np.uint64(32)) | words[:, 1]
    return (bits & np.uint64((1 << 53) - 1)).astype(np.float64) * 2.0**-53


def _box_muller_16(block: np.ndarray) -> None:
    radius = [math.sqrt(-2.0 * math.log(1.0 - u)) for u in block[:8]]
    theta = [2.0 * math.pi * u for u in block[8:16]]
    block[:8] = [r * math.cos(t) for r, t in zip(radius, theta)]
    block[8:16] = [r * math.sin(t) for r, t in zip(radius, theta)]


class TorchCPUGenerator:
    """`TorchCPUGenerator(seed).randn(*shape)` == `torch.manual_seed(seed); torch.randn(*shape,
    dtype=torch.float64)` and the draws after it, for arrays of at least 16 elements."""

    def __init__(self, seed: int):
        self._state = np.random.RandomState(seed)

    def randn(self, *shape: int) -> np.ndarray:
        n = math.prod(shape)
        if n < 16:
            raise ValueError(f"shape {shape}: PyTorch draws fewer than 16 normals another way")
        values = _uniform53(self._state, n)
        for start in range(0, n - 15, 16):
            _box_muller_16(values[start:start + 16])
        if n % 16:
            values[n - 16:] = _uniform53(self._state, 16)
            _box_muller_16(values[n - 16:])
        return values.reshape(shape)
