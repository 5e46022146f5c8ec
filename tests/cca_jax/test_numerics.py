"""Numerics at the edges: non-finite inputs reach only the rows that see them, and half
precision with large values keeps a finite backward in every implementation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cca_jax import cca_attention
from cca_kernels.visibility import visible_core_count
from tests.conftest import random_qkv, relative_error, value_and_grads

B, L, H, HKV, D, G, W = 1, 24, 4, 2, 16, 4, 8
IMPLEMENTATIONS = {"reference": {}, "xla": {}, "pallas": {"interpret": True}}


def _jitted(implementation):
    options = IMPLEMENTATIONS[implementation]
    return jax.jit(lambda q, k, v: cca_attention(q, k, v, group_size=G, window_size=W,
                                                 implementation=implementation, **options))


def _rows_that_see(tensor: str, position: int) -> np.ndarray:
    """[L] bool: the query rows whose output depends on `tensor`[position] (docs/cca.md §1-2)."""
    m = np.arange(L)
    visible = np.array([visible_core_count(int(x), G, W) for x in m])
    group = position // G
    in_core = visible > group                     # the group's core token is visible
    if tensor == "q":                              # a query shapes its own row, and its
        own = m == position                        # group's core token if it closes it
        return own | (in_core & (position % G == G - 1))
    in_window = (visible * G <= position) & (position <= m)
    return in_window | in_core


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
def test_nonfinite_input_reaches_only_the_rows_that_see_it(implementation):
    """The issue's case (NaN in k at position 3, g=4, w=8: rows 0-2 cannot see it) and every
    other kind: NaN / +Inf / -Inf in q, k or v, at a group's last position and inside one."""
    attend = _jitted(implementation)
    q, k, v, _ = random_qkv(0, B, L, H, HKV, D)
    clean = {"q": q, "k": k, "v": v}
    expected = np.asarray(attend(q, k, v))
    assert np.isfinite(expected).all()
    tried = 0
    for tensor in ("k", "v", "q"):
        for position in (3, 9):
            sees = _rows_that_see(tensor, position)
            assert 0 < sees.sum() < L
            for bad in (np.nan, np.inf, -np.inf):
                inputs = dict(clean)
                inputs[tensor] = clean[tensor].at[:, position].set(bad)
                got = np.asarray(attend(inputs["q"], inputs["k"], inputs["v"]))
                where = f"{implementation}: {bad} in {tensor}[{position}]"
                # Rows that cannot see it: exactly what they are with finite inputs.
                np.testing.assert_array_equal(got[:, ~sees], expected[:, ~sees], err_msg=where)
                # Rows that see it: no finite number pretends to be a result.
                assert not np.isfinite(got[:, sees]).any(), where
                tried += 1
    assert tried == 18


def test_issue_case_rows_before_the_nan_key_are_finite():
    q, k, v, _ = random_qkv(0, B, L, H, HKV, D)
    k = k.at[:, 3].set(jnp.nan)
    for implementation in sorted(IMPLEMENTATIONS):
        out = np.asarray(_jitted(implementation)(q, k, v))
        assert np.isfinite(out[:, :3]).all(), implementation
        assert np.isnan(out[:, 3:]).all(), implementation


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
def test_float16_large_values_backward_is_finite_and_close_to_float32(implementation):
    """|v| ~ 1e4 in float16 (B1 L48 H4 Hkv2 d16, g=4, w=8, seed 0): the true gradients fit in
    float16 (max ~2.7e4 < 65504), but cotangent x values overflowed float16 inside the xla
    backward and turned dq and dk into NaN."""
    q, k, v, dout = random_qkv(0, 1, 48, 4, 2, 16)
    v = v * 1e4
    options = IMPLEMENTATIONS[implementation]

    def attend(q, k, v):
        return cca_attention(q, k, v, group_size=4, window_size=8,
                             implementation=implementation, **options)

    reference = value_and_grads(lambda q, k, v: cca_attention(
        q, k, v, group_size=4, window_size=8, implementation="reference"), q, k, v, dout)
    assert max(float(jnp.abs(x).max()) for x in reference) < 65504
    half = [x.astype(jnp.float16) for x in (q, k, v, dout)]
    got = value_and_grads(attend, *half)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, reference):
        assert x.dtype == jnp.float16, name
        assert relative_error(x.astype(jnp.float32), y) < 2e-2, name
