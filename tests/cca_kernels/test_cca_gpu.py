"""The Pallas kernels on a real GPU (skipped, with the reason, where there is none).

Run on the device: `python -m pytest -q tests/kernels/test_cca_gpu.py`.
"""
import jax
import jax.numpy as jnp
import pytest

from cca_jax import cca_attention
from tests.conftest import golden_cases, random_qkv, relative_error, value_and_grads

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")]


@pytest.mark.parametrize("case", golden_cases())
def test_float32_pallas_matches_golden_on_gpu(case, load_golden):
    gold = load_golden(case)
    g, w = int(gold["g"]), int(gold["w"])
    fn = jax.jit(lambda q, k, v: cca_attention(q, k, v, group_size=g, window_size=w,
                                               implementation="pallas"))
    got = value_and_grads(fn, *(jnp.asarray(gold[n]) for n in ("q", "k", "v", "dout")))
    assert relative_error(got[0], gold["out"]) < 1e-5
    for x, name in zip(got[1:], ("dq", "dk", "dv")):
        assert relative_error(x, gold[name]) < 1e-4, name


@pytest.mark.parametrize("H,Hkv,d", [(4, 4, 128), (8, 2, 64)])
def test_bfloat16_pallas_at_16k_against_float32_reference(H, Hkv, d):
    """bf16 kernels vs the float32 dense reference at L = 16384: out < 1e-2, grads < 2e-2,
    no NaN, and every row of the output right (an unwritten row would be far off)."""
    L, g, w = 16384, 16, 1024
    q, k, v, dout = random_qkv(L + H, 1, L, H, Hkv, d)
    ref = value_and_grads(jax.jit(lambda q, k, v: cca_attention(
        q, k, v, group_size=g, window_size=w, implementation="xla")), q, k, v, dout)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v, dout)]
    got = value_and_grads(jax.jit(lambda q, k, v: cca_attention(
        q, k, v, group_size=g, window_size=w, implementation="pallas")), *bf)
    for x in got:
        assert x.dtype == jnp.bfloat16
        assert bool(jnp.isfinite(x).all())
    assert relative_error(got[0], ref[0]) < 1e-2
    for x, y in zip(got[1:], ref[1:]):
        assert relative_error(x, y) < 2e-2
    row_err = (jnp.linalg.norm((got[0].astype(jnp.float32) - ref[0]), axis=-1)
               / jnp.linalg.norm(ref[0], axis=-1))
    assert float(row_err.max()) < 5e-2, float(row_err.max())


def test_xla_float32_is_the_reference_at_4k_on_gpu():
    """Ties the memory-lean oracle used above to the dense reference on the GPU."""
    q, k, v, dout = random_qkv(7, 1, 4096, 4, 2, 64)
    ref = value_and_grads(jax.jit(lambda q, k, v: cca_attention(
        q, k, v, group_size=16, window_size=1024, implementation="reference")), q, k, v, dout)
    got = value_and_grads(jax.jit(lambda q, k, v: cca_attention(
        q, k, v, group_size=16, window_size=1024, implementation="xla")), q, k, v, dout)
    for x, y in zip(got, ref):
        assert relative_error(x, y) < 1e-5


@pytest.mark.parametrize("L,H,Hkv,d,g,w", [(1000, 8, 1, 64, 16, 100), (333, 4, 2, 128, 64, 64),
                                          (50, 8, 8, 64, 4, 64), (777, 8, 4, 128, 1, 7)])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_ragged_shapes(L, H, Hkv, d, g, w, dtype):
    q, k, v, dout = random_qkv(L, 2, L, H, Hkv, d)
    ref = value_and_grads(lambda q, k, v: cca_attention(
        q, k, v, group_size=g, window_size=w, implementation="reference"), q, k, v, dout)
    cast = [x.astype(dtype) for x in (q, k, v, dout)]
    got = value_and_grads(jax.jit(lambda q, k, v: cca_attention(
        q, k, v, group_size=g, window_size=w, implementation="pallas")), *cast)
    assert relative_error(got[0], ref[0]) < 1e-2
    for x, y in zip(got[1:], ref[1:]):
        assert relative_error(x, y) < 2e-2
