"""Every implementation of cca_attention against the authors' golden vectors (float32)."""
import jax.numpy as jnp
import pytest

from cca_jax import cca_attention
from cca_jax.blocked import cca_blocked
from tests.conftest import golden_cases, relative_error, value_and_grads


IMPLEMENTATIONS = {
    "reference": lambda g, w: lambda q, k, v: cca_attention(
        q, k, v, group_size=g, window_size=w, implementation="reference"),
    "xla": lambda g, w: lambda q, k, v: cca_attention(
        q, k, v, group_size=g, window_size=w, implementation="xla"),
    # Small chunks so that every golden case crosses several chunk boundaries.
    "xla_chunk96": lambda g, w: lambda q, k, v: cca_blocked(
        q, k, v, group_size=g, window_size=w, scale=q.shape[-1] ** -0.5, chunk_size=96),
}


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("case", golden_cases())
def test_matches_golden(case, implementation, load_golden):
    gold = load_golden(case)
    fn = IMPLEMENTATIONS[implementation](int(gold["g"]), int(gold["w"]))
    out, dq, dk, dv = value_and_grads(fn, *(jnp.asarray(gold[name])
                                            for name in ("q", "k", "v", "dout")))
    assert out.dtype == jnp.float32
    assert relative_error(out, gold["out"]) < 1e-5
    assert relative_error(dq, gold["dq"]) < 1e-4
    assert relative_error(dk, gold["dk"]) < 1e-4
    assert relative_error(dv, gold["dv"]) < 1e-4
