"""The CCA Pallas kernels (interpret mode on the CPU) against the reference on fresh random
inputs, and the kernels' loop bounds, tile sizes and argument checks.

`pool_core_tokens` (jnp) composed with `cca_attention_pallas` must give the same function and
the same gradients (through the pooling too) as `cca_reference`. Small tiles (16) so that every
case crosses many query, key and core block boundaries and ends in a ragged block.
The golden vectors, the core-token gradients, half precision and the Triton lowering are in
test_cca_pallas_numerics.py (a second file, so that pytest-xdist's --dist loadfile can give the
two halves of these slow interpret-mode compiles to different workers).
"""
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from cca_jax.reference import cca_reference
from cca_kernels import cca_common
from cca_kernels.cca_attention import BlockSizes, cca_attention_pallas
from cca_kernels.visibility import visible_core_count
from tests.cca_kernels.pallas_helpers import MIXED, SMALL, pallas_cca
from tests.conftest import random_qkv, relative_error, value_and_grads

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
    got = value_and_grads(pallas_cca(g, w, scale, blocks), q, k, v, dout)
    assert got[0].dtype == q.dtype and got[0].shape == q.shape
    assert relative_error(got[0], ref[0]) < 1e-5
    # Every output element written, the last ragged block included.
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(ref[0]), rtol=1e-4, atol=1e-5)
    for name, x, y in zip(("dq", "dk", "dv"), got[1:], ref[1:]):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert relative_error(x, y) < 1e-4, name
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-4)


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
            for length in (1, 2048, 8192, 8193, 131072):
                sized = cca_common.default_block_sizes(d, dtype, interpret=False, length=length)
                sized.check(False)
                short = ("h100" in kind or "h200" in kind) and d == 128 and (
                    dtype == jnp.bfloat16) and length <= cca_common.SHORT_FORWARD_LENGTH
                # The H200 measurements (cca_kernels/NOTES.md): 64 x 64 forward tiles with 4
                # warps up to 8K, the long-sequence row above it; backward tiles unchanged.
                want = (64, 64, 4, 3) if short else (sizes.block_q, sizes.block_k,
                                                     sizes.num_warps, sizes.num_stages)
                assert (sized.block_q, sized.block_k, sized.num_warps, sized.num_stages) == want
                assert (sized.block_q_dq, sized.block_k_dkv, sized.num_warps_bwd) == (
                    sizes.block_q_dq, sizes.block_k_dkv, sizes.num_warps_bwd)


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
