"""The CCA Pallas kernels (interpret mode on the CPU) against the reference and golden vectors.

`pool_core_tokens` (jnp) composed with `cca_attention_pallas` must give the same function and
the same gradients (through the pooling too) as `cca_reference`. Small tiles (16) so that every
case crosses many query, key and core block boundaries and ends in a ragged block.
"""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cca_jax.reference import cca_reference, pool_core_tokens
from cca_kernels import cca_common
from cca_kernels.cca_attention import BlockSizes, cca_attention_pallas
from cca_kernels.visibility import visible_core_count
from tests.conftest import golden_cases, random_qkv, relative_error, value_and_grads

SMALL = BlockSizes(16, 16, 16, 16, 16, 16)
MIXED = BlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32, block_q_dkv=32,
                   block_k_dkv=16)


def _pallas_cca(g, w, scale, blocks=SMALL, **kwargs):
    """pool_core_tokens (jnp) + the Pallas kernel (interpret mode), a function of (q, k, v)."""
    def fn(q, k, v):
        L = q.shape[1]
        core_k, core_v = pool_core_tokens(q, k, v, group_size=g, scale=scale,
                                          num_groups=visible_core_count(L - 1, g, w))
        return cca_attention_pallas(q, k, v, core_k, core_v, group_size=g, window_size=w,
                                    scale=scale, interpret=True, block_sizes=blocks, **kwargs)
    return fn


# (B, L, H, Hkv, d, g, w, blocks): ragged L (never a multiple of 16 or of g), GQA ratios
# 1/2/4/8, g in {1, 4, 16, 64} (and 3), w not a multiple of g, w = 1, L < w (no core tokens),
# head dims 16/32/64 and 24 (padded to 32), tiles differing between the kernels.
CASES = [
    (1, 45, 2, 2, 16, 4, 10, SMALL),
    (1, 70, 4, 2, 32, 1, 5, SMALL),
    (2, 57, 4, 1, 16, 16, 20, SMALL),
    (1, 100, 8, 1, 16, 4, 7, SMALL),
    (1, 150, 4, 2, 24, 64, 70, SMALL),
    (1, 203, 2, 2, 16, 64, 1, SMALL),
    (1, 20, 2, 1, 16, 4, 64, SMALL),
    (1, 33, 2, 2, 16, 8, 1, SMALL),
    (1, 131, 4, 2, 64, 4, 23, SMALL),
    (2, 99, 8, 2, 16, 3, 11, MIXED),
    (1, 140, 8, 8, 16, 16, 17, MIXED),
    (1, 77, 4, 1, 32, 1, 1, MIXED),
]


@pytest.mark.parametrize("B,L,H,Hkv,d,g,w,blocks", CASES)
def test_matches_reference(B, L, H, Hkv, d, g, w, blocks):
    q, k, v, dout = random_qkv(1000 + L * 7 + g, B, L, H, Hkv, d)
    scale = d ** -0.5
    ref = value_and_grads(lambda q, k, v: cca_reference(q, k, v, group_size=g, window_size=w,
                                                         scale=scale), q, k, v, dout)
    got = value_and_grads(_pallas_cca(g, w, scale, blocks), q, k, v, dout)
    assert got[0].dtype == q.dtype and got[0].shape == q.shape
    assert relative_error(got[0], ref[0]) < 1e-5
    # Every output element written, the last ragged block included.
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(ref[0]), rtol=1e-4, atol=1e-5)
    for name, x, y in zip(("dq", "dk", "dv"), got[1:], ref[1:]):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert relative_error(x, y) < 1e-4, name
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-4)


def _dense_given_core(q, k, v, core_k, core_v, g, w, scale):
    """SPEC section 3 with the core tokens given (any C >= c(L - 1)), dense, float32."""
    hi = jax.lax.Precision.HIGHEST
    L, H = q.shape[1], q.shape[2]
    r = H // k.shape[2]
    C = core_k.shape[1]
    k_rep, v_rep = jnp.repeat(k, r, axis=2), jnp.repeat(v, r, axis=2)
    m = jnp.arange(L)
    c = visible_core_count(m, g, w)
    cmask = jnp.arange(C)[None, :] < c[:, None]
    rmask = (m[None, :] >= c[:, None] * g) & (m[None, :] <= m[:, None])
    cs = jnp.einsum("bmhd,bjhd->bhmj", q, core_k, precision=hi) * scale
    rs = jnp.einsum("bmhd,bnhd->bhmn", q, k_rep, precision=hi) * scale
    p = jax.nn.softmax(jnp.concatenate([jnp.where(cmask, cs, -jnp.inf),
                                        jnp.where(rmask, rs, -jnp.inf)], -1), -1)
    return (jnp.einsum("bhmj,bjhd->bmhd", p[..., :C], core_v, precision=hi)
            + jnp.einsum("bhmn,bnhd->bmhd", p[..., C:], v_rep, precision=hi))


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
    reference = lambda *a: _dense_given_core(*a, g, w, scale)  # noqa: E731

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
    out, dq, dk, dv = value_and_grads(_pallas_cca(g, w, d ** -0.5, blocks), q, k, v,
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
    got = value_and_grads(_pallas_cca(g, w, scale), q, k, v, dout)
    assert all(x.dtype == dtype for x in got)
    for x, y in zip(got, ref):
        assert relative_error(f32(x), y) < 2e-2


def test_allow_tf32_is_exact_in_interpret_mode():
    """allow_tf32 only changes GPU dots; the interpreter computes float32 products."""
    q, k, v, dout = random_qkv(5, 1, 40, 2, 1, 16)
    ref = value_and_grads(_pallas_cca(4, 6, 0.25), q, k, v, dout)
    got = value_and_grads(_pallas_cca(4, 6, 0.25, allow_tf32=True), q, k, v, dout)
    for x, y in zip(got, ref):
        assert relative_error(x, y) < 1e-5


def _check_segments(segments, visible, blocks_of):
    """Segments cover exactly the blocks with a visible pair, in order; unmasked ones are
    fully visible. `visible(i)` is the block's boolean visibility tile."""
    covered = []
    for start, stop, masked in segments:
        start, stop = int(start), int(stop)
        assert start <= stop
        covered += list(range(start, stop))
        if not masked:
            for i in range(start, stop):
                assert visible(i).all(), (i, "unmasked block with an invisible pair")
    assert covered == [i for i in blocks_of if visible(i).any()]


@pytest.mark.parametrize("g,w", [(1, 1), (1, 7), (3, 5), (4, 16), (16, 40), (5, 1), (2, 64)])
@pytest.mark.parametrize("bq,bk", [(4, 8), (8, 4), (8, 8), (16, 4)])
def test_block_ranges_are_exact(g, w, bq, bk):
    """The loop bounds cover exactly the blocks holding a visible (query, key) pair, and the
    mask-free segments hold only visible pairs."""
    Lp = 96
    m = np.arange(Lp)
    c = np.array([visible_core_count(int(x), g, w) for x in m])
    raw = (m[None, :] >= (c * g)[:, None]) & (m[None, :] <= m[:, None])   # [query, key]
    core = np.arange(Lp)[None, :] < c[:, None]                              # [query, core]
    n_qb, n_kb = Lp // bq, Lp // bk
    for qb in range(n_qb):
        rows = slice(qb * bq, (qb + 1) * bq)
        _check_segments(cca_common.raw_key_blocks(qb * bq, bq, bk, g, w),
                        lambda kb: raw[rows, kb * bk:(kb + 1) * bk], range(n_kb))
        _check_segments(cca_common.core_blocks(qb * bq, bq, bk, g, w, n_kb),
                        lambda cb: core[rows, cb * bk:(cb + 1) * bk], range(n_kb))
    for kb in range(n_kb):
        cols = slice(kb * bk, (kb + 1) * bk)
        _check_segments(cca_common.query_blocks_for_keys(kb * bk, bk, bq, g, w, n_qb),
                        lambda qb: raw[qb * bq:(qb + 1) * bq, cols], range(n_qb))
        _check_segments(cca_common.query_blocks_for_cores(kb * bk, bk, bq, g, w, n_qb),
                        lambda qb: core[qb * bq:(qb + 1) * bq, cols], range(n_qb))


def test_block_size_resolution():
    interp = cca_common.resolve_block_sizes(None, 64, jnp.float32, 1000, interpret=True)
    assert all(getattr(interp, f) & (getattr(interp, f) - 1) == 0
               for f in BlockSizes.TILE_FIELDS)
    override = cca_common.resolve_block_sizes({"block_q": 8}, 64, jnp.bfloat16, 1000,
                                              interpret=True)
    assert override.block_q == 8
    short = cca_common.resolve_block_sizes(BlockSizes(128, 64, 64, 64, 64, 64), 128,
                                           jnp.bfloat16, 20, interpret=False)
    assert short.block_q == 32 and short.block_k == 32
    cca_common.default_block_sizes(128, jnp.bfloat16, interpret=False).check(False)
    with pytest.raises(ValueError, match="power of 2"):
        cca_common.resolve_block_sizes({"block_k": 48}, 64, jnp.float32, 100, interpret=True)
    with pytest.raises(ValueError, match="unknown"):
        cca_common.resolve_block_sizes({"block_z": 16}, 64, jnp.float32, 100, interpret=True)


def test_gpu_table_is_valid(monkeypatch):
    for kind in ("nvidia h100 80gb hbm3", "nvidia h200", "nvidia a100-sxm4-80gb", "tesla t4"):
        monkeypatch.setattr(cca_common, "_device_kind", lambda kind=kind: kind)
        for d, dtype in itertools.product((16, 64, 128, 256), (jnp.bfloat16, jnp.float32)):
            sizes = cca_common.default_block_sizes(d, dtype, interpret=False)
            sizes.check(False)
            if "h100" in kind and d == 128 and dtype == jnp.bfloat16:
                # The tuned H100 row (cca_kernels/NOTES.md).
                assert (sizes.block_q, sizes.block_k, sizes.num_warps) == (128, 128, 8)
                assert (sizes.num_warps_bwd, sizes.num_stages_bwd) == (4, 2)


def test_invalid_arguments():
    q, k, v, _ = random_qkv(0, 1, 40, 4, 2, 16)
    core = jnp.zeros((1, 7, 4, 16), jnp.float32)   # c(39) = (40 - 8) // 4 = 8 needed
    call = lambda *a, **kw: cca_attention_pallas(  # noqa: E731
        *a, **{"group_size": 4, "window_size": 8, "scale": 0.25, "interpret": True, **kw})
    with pytest.raises(ValueError, match="core tokens"):
        call(q, k, v, core, core)
    core = jnp.zeros((1, 8, 4, 16), jnp.float32)
    with pytest.raises(ValueError, match="group_size"):
        call(q, k, v, core, core, group_size=0)
    with pytest.raises(ValueError, match="window_size"):
        call(q, k, v, core, core, window_size=0)
    with pytest.raises(ValueError, match="multiple"):
        call(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2), core, core)
    with pytest.raises(TypeError, match="dtype"):
        call(q, k.astype(jnp.bfloat16), v, core, core)
    with pytest.raises(ValueError, match="core_k"):
        call(q, k, v, core[..., :8], core[..., :8])
    with pytest.raises(ValueError, match="scale"):
        call(q, k, v, core, core, scale=0.0)


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
    got = value_and_grads(_pallas_cca(g, w, scale), q, k, v, dout)
    assert relative_error(got[0], ref[0]) < 1e-5
    for x, y in zip(got[1:], ref[1:]):
        assert relative_error(x, y) < 1e-4
