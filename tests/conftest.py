"""Shared test helpers: golden vectors, random CCA inputs and relative errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

# ../shared/golden beside the checkout; CCA_GOLDEN_DIR overrides it (e.g. on a device machine
# where only the checkout travels).
GOLDEN_DIR = Path(os.environ.get("CCA_GOLDEN_DIR")
                  or Path(__file__).resolve().parents[1].parent / "shared" / "golden")


def golden_cases() -> list[str]:
    cases = GOLDEN_DIR / "cases.json"
    if not cases.is_file():
        raise FileNotFoundError(f"golden vectors not found at {GOLDEN_DIR} (../shared/golden)")
    return [case["name"] for case in json.loads(cases.read_text())]


@pytest.fixture
def load_golden():
    def load(name: str) -> dict[str, np.ndarray]:
        with np.load(GOLDEN_DIR / f"{name}.npz") as data:
            return {key: data[key] for key in data.files}
    return load


def relative_error(x, reference) -> float:
    x = np.asarray(x, np.float64)
    reference = np.asarray(reference, np.float64)
    assert x.shape == reference.shape, (x.shape, reference.shape)
    assert np.all(np.isfinite(x)), "non-finite values"
    return float(np.linalg.norm(x - reference) / np.linalg.norm(reference))


def random_qkv(seed: int, B: int, L: int, H: int, Hkv: int, d: int, dtype=np.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (B, L, H, d), dtype)
    k = jax.random.normal(keys[1], (B, L, Hkv, d), dtype)
    v = jax.random.normal(keys[2], (B, L, Hkv, d), dtype)
    dout = jax.random.normal(keys[3], (B, L, H, d), dtype)
    return q, k, v, dout
