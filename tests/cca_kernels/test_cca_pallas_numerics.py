"""The CCA Pallas kernels (interpret mode on the CPU): golden vectors, the kernel's own VJP with
core tokens as inputs, half precision, allow_tf32, large logits, and the lowering to Triton.

(The comparison with the reference on fresh random inputs is in test_cca_pallas.py.)
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cca_jax.reference import cca_reference
from cca_kernels import cca_common
from cca_kernels.cca_attention import BlockSizes, cca_attention_pallas
from cca_kernels.visibility import visible_core_count
from tests.cca_kernels.pallas_helpers import SMALL, dense_given_core, pallas_cca
from tests.conftest import golden_cases, random_qkv, relative_error, value_and_grads


@pytest.mark.parametrize("B,L,H,Hkv,d,g,w,all_groups", [
    (1, 90, 4, 2, 16, 4, 13, False),
    (2, 75, 4, 1, 32, 8, 9, True),      # C = L // g > c(L - 1): extra, never visible cores
    (1, 60, 2, 2, 16, 1, 1, True),
])
def test_core_token_gradients(B, L, H, Hkv, d, g, w, all_groups):
    """The kernel's own VJP, dcore_k and dcore_v included, with core tokens as inputs."""
    q, k, v, dout = random_qkv(7 + L, B, L, H, Hkv, d)
    C = L // g if all_groups else visible_core_count(L - 1, g, w)
    keys = jax.random.split(jax.random.PRNGKey(L), 2)
    core_k = jax.random.normal(keys[0], (B, C, H, d), jnp.float32)
    core_v = jax.random.normal(keys[1], (B, C, H, d), jnp.float32)
    scale = 0.3
    kernel = lambda *a: cca_attention_pallas(*a, group_size=g, window_size=w,  # noqa: E731
                                             scale=scale, interpret=True, block_sizes=SMALL)
    reference = lambda *a: dense_given_core(*a, g, w, scale)  # noqa: E731

    @functools.partial(jax.jit, static_argnums=0)
    def value_and_grads(fn, *args):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(dout)

    args = (q, k, v, core_k, core_v)
    out, grads = value_and_grads(kernel, *args)
    ref, ref_grads = value_and_grads(reference, *args)
    assert relative_error(out, ref) < 1e-5
    names = ("dq", "dk", "dv", "dcore_k", "dcore_v")
    for name, x, y in zip(names, grads, ref_grads):
        assert x.shape == y.shape, name
        if not np.any(np.asarray(y)):
            np.testing.assert_array_equal(np.asarray(x), 0.0)
        else:
            assert relative_error(x, y) < 1e-4, name
    if all_groups:  # core tokens no query sees get exactly zero gradient
        n_visible = visible_core_count(L - 1, g, w)
        dck, dcv = grads[3:]
        assert not np.any(np.asarray(dck)[:, n_visible:])
        assert not np.any(np.asarray(dcv)[:, n_visible:])


@pytest.mark.parametrize("case", golden_cases())
def test_matches_golden(case, load_golden):
    gold = load_golden(case)
    g, w = int(gold["g"]), int(gold["w"])
    q, k, v = (jnp.asarray(gold[name]) for name in ("q", "k", "v"))
    d = q.shape[-1]
    blocks = SMALL if q.shape[1] <= 600 else BlockSizes(32, 32, 32, 32, 32, 32)
    out, dq, dk, dv = value_and_grads(pallas_cca(g, w, d ** -0.5, blocks), q, k, v,
                                       jnp.asarray(gold["dout"]))
    assert out.dtype == jnp.float32
    assert relative_error(out, gold["out"]) < 1e-5
    assert relative_error(dq, gold["dq"]) < 1e-4
    assert relative_error(dk, gold["dk"]) < 1e-4
    assert relative_error(dv, gold["dv"]) < 1e-4


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("B,L,H,Hkv,d,g,w", [(1, 83, 4, 2, 32, 4, 10), (1, 150, 8, 2, 64, 16, 33)])
def test_half_precision(dtype, B, L, H, Hkv, d, g, w):
    q, k, v, dout = (x.astype(dtype) for x in random_qkv(L + 3, B, L, H, Hkv, d))
    scale = d ** -0.5
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref = value_and_grads(lambda q, k, v: cca_reference(q, k, v, group_size=g, window_size=w,
                                                         scale=scale),
                           f32(q), f32(k), f32(v), f32(dout))
    got = value_and_grads(pallas_cca(g, w, scale), q, k, v, dout)
    assert all(x.dtype == dtype for x in got)
    for x, y in zip(got, ref):
        assert relative_error(f32(x), y) < 2e-2


def test_allow_tf32_is_exact_in_interpret_mode():
    """allow_tf32 only changes GPU dots; the interpreter computes float32 products."""
    q, k, v, dout = random_qkv(5, 1, 40, 2, 1, 16)
    ref = value_and_grads(pallas_cca(4, 6, 0.25), q, k, v, dout)
    got = value_and_grads(pallas_cca(4, 6, 0.25, allow_tf32=True), q, k, v, dout)
    for x, y in zip(got, ref):
        assert relative_error(x, y) < 1e-5


def _cuda_lowering_available() -> bool:
    try:
        jax.jit(lambda x: x + 1).trace(jnp.zeros(4)).lower(lowering_platforms=("cuda",))
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _cuda_lowering_available(), reason="no CUDA cross-lowering here")
@pytest.mark.parametrize("dtype,d,H,Hkv,L,g,w", [
    (jnp.bfloat16, 128, 8, 2, 700, 16, 300),
    (jnp.float16, 64, 4, 1, 1000, 4, 64),
    (jnp.float32, 64, 4, 4, 300, 16, 40),
    (jnp.bfloat16, 64, 2, 2, 100, 16, 1024),   # no core tokens
    (jnp.bfloat16, 80, 2, 1, 200, 8, 24),       # head dim padded to 128
])
def test_lowers_to_triton(dtype, d, H, Hkv, L, g, w, monkeypatch):
    """Forward and backward kernels lower to Triton IR with the H100 tile table (the Triton
    compilation itself needs a GPU)."""
    monkeypatch.setattr(cca_common, "_device_kind", lambda: "nvidia h100 80gb hbm3")
    C = visible_core_count(L - 1, g, w)
    q = jax.ShapeDtypeStruct((1, L, H, d), dtype)
    kv = jax.ShapeDtypeStruct((1, L, Hkv, d), dtype)
    core = jax.ShapeDtypeStruct((1, C, H, d), jnp.float32)

    def loss(q, k, v, ck, cv):
        out = cca_attention_pallas(q, k, v, ck, cv, group_size=g, window_size=w, scale=0.1)
        return out.astype(jnp.float32).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    # No GPU here: lower for an abstract one (jax >= 0.12 asks Pallas' Triton backend for
    # the target GPU's kind and finds none on a CPU-only machine otherwise).
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                       platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)
    with jax.sharding.use_abstract_mesh(mesh):
        text = grad.trace(q, kv, kv, core, core).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == (4 if C else 3)


def test_large_logits():
    """Scores in the hundreds: the online softmax rescaling never overflows, no NaN leaks
    from masked, fully-masked or padded rows into any gradient."""
    B, L, H, Hkv, d, g, w = 1, 75, 4, 2, 16, 4, 9
    q, k, v, dout = random_qkv(11, B, L, H, Hkv, d)
    scale = 6.0
    ref = value_and_grads(lambda q, k, v: cca_reference(q, k, v, group_size=g, window_size=w,
                                                         scale=scale), q, k, v, dout)
    got = value_and_grads(pallas_cca(g, w, scale), q, k, v, dout)
    assert relative_error(got[0], ref[0]) < 1e-5
    for x, y in zip(got[1:], ref[1:]):
        assert relative_error(x, y) < 1e-4
