"""The blocked XLA path against the reference on fresh random inputs, plus op semantics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cca_jax import causal_attention, cca_attention
from cca_jax.blocked import cca_blocked
from cca_kernels.visibility import visible_core_count
from tests.conftest import random_qkv, relative_error, value_and_grads

# (B, L, H, Hkv, d, g, w, chunk): ragged L, GQA ratios 1/2/4/8, g in {1, 3, 4, 16, 64},
# w not a multiple of g, L < w, chunk not dividing L.
CASES = [
    (1, 37, 4, 4, 16, 4, 8, 16),
    (2, 130, 8, 2, 32, 16, 40, 48),
    (1, 50, 8, 1, 16, 16, 64, 16),
    (1, 200, 4, 2, 16, 1, 5, 64),
    (1, 300, 2, 1, 16, 64, 64, 100),
    (2, 257, 4, 4, 8, 3, 7, 32),
    (1, 96, 4, 1, 8, 4, 1, 40),
]


@pytest.mark.parametrize("B,L,H,Hkv,d,g,w,chunk", CASES)
def test_xla_matches_reference(B, L, H, Hkv, d, g, w, chunk):
    q, k, v, dout = random_qkv(L * 7 + g, B, L, H, Hkv, d)
    scale = d ** -0.5
    ref = value_and_grads(lambda q, k, v: cca_attention(
        q, k, v, group_size=g, window_size=w, implementation="reference"), q, k, v, dout)
    got = value_and_grads(lambda q, k, v: cca_blocked(q, k, v, group_size=g, window_size=w,
                                                      scale=scale, chunk_size=chunk),
                          q, k, v, dout)
    assert relative_error(got[0], ref[0]) < 1e-5
    for x, y in zip(got[1:], ref[1:]):
        assert relative_error(x, y) < 1e-4


def test_bfloat16_inputs_close_to_float32_reference():
    q, k, v, dout = random_qkv(11, 1, 333, 4, 2, 32)
    ref = value_and_grads(lambda q, k, v: cca_attention(
        q, k, v, group_size=16, window_size=40, implementation="reference"), q, k, v, dout)
    cast = [x.astype(jnp.bfloat16) for x in (q, k, v, dout)]
    got = value_and_grads(lambda q, k, v: cca_attention(
        q, k, v, group_size=16, window_size=40, implementation="xla"), *cast)
    assert got[0].dtype == jnp.bfloat16
    assert relative_error(got[0], ref[0]) < 2e-2
    for x, y in zip(got[1:], ref[1:]):
        assert x.dtype == jnp.bfloat16
        assert relative_error(x, y) < 2e-2


@pytest.mark.parametrize("implementation", ["reference", "xla"])
@pytest.mark.parametrize("g,w", [(1, 1), (4, 100), (16, 100)])
def test_reduces_to_causal_attention(implementation, g, w):
    """g = w = 1 and w >= L are exactly causal attention (docs/cca.md §2)."""
    q, k, v, _ = random_qkv(3, 2, 100, 4, 2, 16)
    # Jitted: eagerly, op by op, the reference compiled each of its primitives on its own.
    cca = jax.jit(lambda q, k, v: cca_attention(q, k, v, group_size=g, window_size=w,
                                                implementation=implementation))(q, k, v)
    full = jax.jit(lambda q, k, v: causal_attention(q, k, v, implementation="reference"))(
        q, k, v)
    np.testing.assert_allclose(cca, full, atol=1e-5, rtol=0)


def test_causal_xla_matches_dense():
    q, k, v, _ = random_qkv(5, 1, 300, 4, 1, 16)
    dense = jax.nn.dot_product_attention(q, k, v.astype(q.dtype), is_causal=True,
                                         implementation="xla")
    assert relative_error(causal_attention(q, k, v, implementation="xla"), dense) < 1e-5


def test_visible_core_count_formula():
    g, w = 16, 40
    m = np.arange(200)
    expected = np.maximum(0, np.floor((m + 1 - w) / g)).astype(int)
    np.testing.assert_array_equal(visible_core_count(jnp.asarray(m), g, w), expected)
    assert [visible_core_count(int(x), g, w) for x in m] == list(expected)
    # With w % g == 0 this is the original kernel's mask (docs/cca.md §2).
    g, w = 4, 16
    for x in range(100):
        c = visible_core_count(x, g, w)
        assert all(((x - (g - 1) - w) // g >= j) == (j < c) for j in range(30))


def test_no_length_squared_array_in_xla_path():
    """Neither the forward nor the backward of the blocked path holds an L x L array."""
    L = 2048
    q, k, v, _ = random_qkv(0, 1, L, 2, 1, 8)
    loss = lambda q, k, v: cca_attention(q, k, v, group_size=16, window_size=64,
                                         implementation="xla").sum()
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    def sizes(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                yield int(np.prod(var.aval.shape))
            for param in eqn.params.values():
                for sub in (param if isinstance(param, (list, tuple)) else [param]):
                    inner = getattr(sub, "jaxpr", None)
                    if inner is not None:
                        yield from sizes(getattr(inner, "jaxpr", inner))

    largest = max(sizes(jaxpr.jaxpr))
    # A chunk's scores: H * chunk * (L/g + chunk + w + g) = 2 * 512 * 767 ~ 0.8M < L*L = 4.2M.
    assert largest < L * L // 4, largest


BAD_ARGUMENTS = [
    (dict(group_size=0), ValueError, "group_size"),
    (dict(window_size=0), ValueError, "window_size"),
    (dict(group_size=2.0), TypeError, "group_size"),
    (dict(window_size=True), TypeError, "window_size"),
    (dict(scale=-1.0), ValueError, "scale"),
    (dict(implementation="cuda"), ValueError, "implementation"),
]


@pytest.mark.parametrize("kwargs,error,word", BAD_ARGUMENTS)
def test_bad_arguments_raise_clear_errors(kwargs, error, word):
    q, k, v, _ = random_qkv(0, 1, 8, 2, 1, 4)
    args = dict(group_size=2, window_size=4) | kwargs
    with pytest.raises(error, match=word):
        cca_attention(q, k, v, **args)


def test_bad_shapes_and_dtypes_raise_clear_errors():
    q, k, v, _ = random_qkv(0, 1, 8, 3, 2, 4)
    with pytest.raises(ValueError, match=r"multiple of the number of key/value heads"):
        cca_attention(q, k, v, group_size=2, window_size=4)
    q, k, v, _ = random_qkv(0, 1, 8, 2, 1, 4)
    with pytest.raises(ValueError, match="batch and length"):
        cca_attention(q, k[:, :4], v[:, :4], group_size=2, window_size=4)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        cca_attention(q, k, v[..., :2], group_size=2, window_size=4)
    with pytest.raises(ValueError, match="head_dim"):
        cca_attention(q, k[..., :2], v[..., :2], group_size=2, window_size=4)
    with pytest.raises(TypeError, match="one dtype"):
        cca_attention(q, k.astype(jnp.bfloat16), v, group_size=2, window_size=4)
    with pytest.raises(ValueError, match=r"q must have shape"):
        cca_attention(q[0], k, v, group_size=2, window_size=4)
    with pytest.raises(TypeError, match="floating-point"):
        cca_attention(q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32),
                      group_size=2, window_size=4)
