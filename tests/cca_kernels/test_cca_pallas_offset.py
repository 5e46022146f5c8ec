"""The Pallas kernels on a shard of a longer sequence (`query_offset`, a halo of earlier keys;
what cca_jax.context runs per device), interpret mode on the CPU.

A shard's output and its gradients in q, the halo-and-own keys / values and the global core
tokens must be the dense definition's (docs/cca.md §3, core tokens given) restricted to the
shard's rows: forward 1e-5, gradients 1e-4 relative, float32. The halo is laid out as
cca_jax.context lays it out: `halo` rows before the first query, zeros where they fall
before position 0 (never visible). Also: the loop bounds stay exact in global positions, the
whole sequence through the traced-offset code gives the same bits, and the kernels with a
traced offset lower to Triton.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cca_kernels import cca_common
from cca_kernels.cca_attention import cca_attention_pallas
from cca_kernels.visibility import visible_core_count
from tests.cca_kernels.pallas_helpers import MIXED, SMALL, dense_given_core, pallas_cca
from tests.cca_kernels.test_cca_pallas_numerics import _cuda_lowering_available
from tests.conftest import random_qkv, relative_error, value_and_grads

# (B, H, Hkv, d, g, w, m0, Lq, halo, blocks, traced): queries at positions m0 .. m0 + Lq - 1,
# keys from m0 - halo. halo_length(g, w) = w + g - 2 in whole groups unless said otherwise.
CASES = {
    "first shard, halo all before 0": (1, 2, 2, 16, 4, 10, 0, 32, 12, SMALL, True),
    "offset g, halo partly before 0": (1, 2, 2, 16, 4, 10, 4, 32, 12, SMALL, True),
    "several groups, GQA": (2, 4, 2, 16, 4, 10, 48, 32, 12, SMALL, True),
    "several groups, static offset": (2, 4, 2, 16, 4, 10, 48, 32, 12, SMALL, False),
    "halo clipped at 0": (1, 4, 1, 16, 4, 10, 8, 24, 8, SMALL, True),
    "ragged last shard, d 24": (1, 4, 2, 24, 4, 10, 64, 37, 12, MIXED, True),
    "w % g != 0, offset not in whole groups": (1, 2, 2, 16, 16, 17, 70, 48, 32, MIXED, True),
    "w + g longer than the shard": (1, 2, 1, 16, 4, 40, 64, 16, 44, SMALL, True),
    "g = w = 1, no halo": (1, 2, 2, 16, 1, 1, 40, 24, 0, SMALL, True),
    "deep: many core blocks": (1, 2, 2, 16, 4, 8, 200, 32, 12, SMALL, True),
    "halo = the whole prefix, static": (1, 2, 2, 16, 3, 5, 30, 20, 30, SMALL, False),
}


def _halo_rows(x, m0, halo):
    """Rows m0 - halo .. m0 - 1 of the sequence x, zeros before position 0."""
    dummy = max(0, halo - m0)
    return jnp.concatenate([jnp.zeros((x.shape[0], dummy, *x.shape[2:]), x.dtype),
                            x[:, max(0, m0 - halo):m0]], axis=1)


def _shard_vs_dense(B, H, Hkv, d, g, w, m0, Lq, halo, blocks, traced, seed=0):
    """Relative errors (forward, dq, dk, dv, dcore_k, dcore_v) of the kernel on the shard
    against the dense definition of the whole prefix restricted to the shard's rows."""
    L = m0 + Lq
    C = visible_core_count(L - 1, g, w) + 3          # a few core tokens no row sees
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(keys[0], (B, L, H, d))
    k = jax.random.normal(keys[1], (B, L, Hkv, d))
    v = jax.random.normal(keys[2], (B, L, Hkv, d))
    core_k = jax.random.normal(keys[3], (B, C, H, d))
    core_v = jax.random.normal(keys[4], (B, C, H, d))
    dout = jax.random.normal(keys[5], (B, Lq, H, d))
    scale = d ** -0.5

    want, vjp = jax.vjp(lambda *a: dense_given_core(*a, g, w, scale)[:, m0:],
                        q, k, v, core_k, core_v)
    dq, dk, dv, dck, dcv = vjp(dout)
    shard = lambda x: jnp.concatenate([_halo_rows(x, m0, halo), x[:, m0:]], axis=1)  # noqa: E731
    want_grads = (dq[:, m0:], shard(dk), shard(dv), dck, dcv)

    @jax.jit
    def run(q_s, k_s, v_s, core_k, core_v, dout, offset):
        def fn(*a):
            return cca_attention_pallas(*a, group_size=g, window_size=w, scale=scale,
                                        interpret=True, block_sizes=blocks,
                                        query_offset=offset if traced else m0)
        out, vjp = jax.vjp(fn, q_s, k_s, v_s, core_k, core_v)
        return out, vjp(dout)

    got, grads = run(q[:, m0:], shard(k), shard(v), core_k, core_v, dout, jnp.int32(m0))
    # The keys before the halo get no gradient from the definition either.
    assert float(jnp.abs(dk[:, :max(0, m0 - halo)]).sum()) == 0.0
    return [relative_error(got, want)] + [relative_error(x, y)
                                          for x, y in zip(grads, want_grads)]


@pytest.mark.parametrize("case", list(CASES))
def test_shard_matches_dense_rows(case):
    errors = _shard_vs_dense(*CASES[case])
    assert errors[0] < 1e-5, errors
    assert max(errors[1:]) < 1e-4, errors


def test_traced_offset_zero_gives_the_whole_sequence_bits():
    """query_offset 0 traced (the offset code, no halo) == the default call, bit for bit:
    the same blocks in the same order, only the bounds computed another way."""
    B, L, H, Hkv, d, g, w = 1, 70, 4, 2, 16, 4, 10
    q, k, v, dout = random_qkv(3, B, L, H, Hkv, d)
    plain = value_and_grads(pallas_cca(g, w, 0.25), q, k, v, dout)
    # An array, even a concrete one, takes the traced-offset kernels.
    traced = value_and_grads(pallas_cca(g, w, 0.25, query_offset=jnp.int32(0)), q, k, v, dout)
    for x, y in zip(traced, plain):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _check_segments(segments, visible, blocks_of):
    covered = []
    for start, stop, masked in segments:
        start, stop = int(start), int(stop)
        assert start <= stop
        covered += list(range(start, stop))
        if not masked:
            for i in range(start, stop):
                assert visible(i).all(), (i, "unmasked block with an invisible pair")
    assert covered == [i for i in blocks_of if visible(i).any()]


@pytest.mark.parametrize("g,w", [(1, 1), (3, 5), (4, 16), (16, 40), (5, 1), (2, 30)])
@pytest.mark.parametrize("bq,bk", [(4, 8), (8, 4), (8, 8)])
@pytest.mark.parametrize("m0,pad", [(0, 0), (0, 8), (8, 0), (37, 3), (64, 0), (100, 16)])
def test_block_ranges_are_exact_in_global_positions(g, w, bq, bk, m0, pad):
    """Queries at m0 .., keys from m0 - halo - pad (the least halo that holds every visible
    key, `pad` more rows before it, some at negative positions): the loop bounds cover
    exactly the blocks holding a visible pair, and the mask-free segments only visible
    pairs."""
    Lq = 48
    need = m0 - visible_core_count(m0, g, w) * g      # keys a query needs before m0
    k0 = m0 - need - pad
    Lk = m0 + Lq - k0
    m = m0 + np.arange(Lq)
    n = k0 + np.arange(Lk)
    c = np.array([visible_core_count(int(x), g, w) for x in m])
    raw = (n[None, :] >= (c * g)[:, None]) & (n[None, :] <= m[:, None])    # [query, key]
    C = 64
    core = np.arange(C)[None, :] < c[:, None]                              # [query, core]
    n_qb, n_kb, n_cb = Lq // bq, -(-Lk // bk), C // bk
    raw = np.pad(raw, [(0, 0), (0, n_kb * bk - Lk)])
    for qb in range(n_qb):
        rows = slice(qb * bq, (qb + 1) * bq)
        _check_segments(cca_common.raw_key_blocks(m0 + qb * bq, bq, bk, g, w, key_start=k0),
                        lambda kb: raw[rows, kb * bk:(kb + 1) * bk], range(n_kb))
        _check_segments(cca_common.core_blocks(m0 + qb * bq, bq, bk, g, w, n_cb),
                        lambda cb: core[rows, cb * bk:(cb + 1) * bk], range(n_cb))
    for kb in range(n_kb):
        cols = slice(kb * bk, (kb + 1) * bk)
        _check_segments(cca_common.query_blocks_for_keys(k0 + kb * bk, bk, bq, g, w, n_qb,
                                                         query_start=m0),
                        lambda qb: raw[qb * bq:(qb + 1) * bq, cols], range(n_qb))
    for cb in range(n_cb):
        cols = slice(cb * bk, (cb + 1) * bk)
        _check_segments(cca_common.query_blocks_for_cores(cb * bk, bk, bq, g, w, n_qb,
                                                          query_start=m0),
                        lambda qb: core[qb * bq:(qb + 1) * bq, cols], range(n_qb))


def test_offset_arguments_are_checked():
    q, k, v, _ = random_qkv(0, 1, 16, 2, 2, 16)
    kv = jnp.concatenate([k, k], axis=1)          # 16 halo rows before the queries' own
    core = jnp.zeros((1, 40, 2, 16), jnp.float32)
    call = lambda *a, **kw: cca_attention_pallas(  # noqa: E731
        *a, **{"group_size": 4, "window_size": 8, "scale": 0.25, "interpret": True, **kw})
    with pytest.raises(ValueError, match="halo"):
        call(q, k, v, core, core, query_offset=64)         # the queries need 10 earlier keys
    with pytest.raises(ValueError, match=">= 0"):
        call(q, kv, kv, core, core, query_offset=-4)
    with pytest.raises(ValueError, match="core tokens"):
        call(q, kv, kv, core[:, :10], core[:, :10], query_offset=64)
    with pytest.raises(TypeError, match="query_offset"):
        call(q, kv, kv, core, core, query_offset=4.0)
    with pytest.raises(TypeError, match="query_offset"):
        call(q, kv, kv, core, core, query_offset=jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="Lk >= 16"):
        call(q, k[:, :8], v[:, :8], core, core)


@pytest.mark.skipif(not _cuda_lowering_available(), reason="no CUDA cross-lowering here")
@pytest.mark.parametrize("dtype,d,H,Hkv,Lq,halo,g,w", [
    (jnp.bfloat16, 128, 8, 2, 512, 1040, 16, 1024),   # a shard at the paper's g, w
    (jnp.float32, 64, 4, 4, 300, 44, 4, 40),           # ragged, halo not in whole tiles
])
def test_traced_offset_lowers_to_triton(dtype, d, H, Hkv, Lq, halo, g, w, monkeypatch):
    """The four kernels with a traced query offset (as inside shard_map) lower to Triton IR
    with the H100 tile table."""
    monkeypatch.setattr(cca_common, "_device_kind", lambda: "nvidia h100 80gb hbm3")
    C = 4096
    q = jax.ShapeDtypeStruct((1, Lq, H, d), dtype)
    kv = jax.ShapeDtypeStruct((1, halo + Lq, Hkv, d), dtype)
    core = jax.ShapeDtypeStruct((1, C, H, d), dtype)
    offset = jax.ShapeDtypeStruct((), jnp.int32)

    def loss(q, k, v, ck, cv, offset):
        out = cca_attention_pallas(q, k, v, ck, cv, group_size=g, window_size=w, scale=0.1,
                                   query_offset=offset)
        return out.astype(jnp.float32).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                       platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)
    with jax.sharding.use_abstract_mesh(mesh):
        text = grad.trace(q, kv, kv, core, core, offset).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 4


def _expand(segments, shift=0, keep=range(-(1 << 30), 1 << 30)):
    return [(i + shift, bool(masked)) for start, stop, masked in segments
            for i in range(int(start), int(stop)) if i in keep]


@pytest.mark.parametrize("g,w,bq,bk", [(16, 100, 32, 32), (4, 10, 32, 16), (16, 1024, 64, 64)])
def test_a_shard_visits_the_blocks_the_whole_sequence_visits(g, w, bq, bk):
    """The wrapper pads the halo at its front to whole tiles, so a shard's query and key
    blocks line up with the whole sequence's: for every shard, each kernel loop visits the
    same blocks, masked the same way, as the whole-sequence kernels for those rows (no block
    of the halo that its rows cannot see, no extra boundary block)."""
    from cca_jax.context import halo_length
    L, n = 4096, 4
    Ls = L // n
    kv_halo = -(-halo_length(g, w) // max(bq, bk)) * max(bq, bk)
    n_core = L // g // bk
    for s in range(n):
        m0, k0 = s * Ls, s * Ls - kv_halo
        for qb in range(Ls // bq):
            shard = cca_common.raw_key_blocks(m0 + qb * bq, bq, bk, g, w, key_start=k0)
            whole = cca_common.raw_key_blocks(m0 + qb * bq, bq, bk, g, w)
            assert _expand(shard, k0 // bk) == _expand(whole)
        own_q = range(m0 // bq, (m0 + Ls) // bq)
        for kb in range((kv_halo + Ls) // bk):
            shard = cca_common.query_blocks_for_keys(k0 + kb * bk, bk, bq, g, w, Ls // bq,
                                                     query_start=m0)
            if k0 + kb * bk < 0:
                assert _expand(shard) == []
                continue
            whole = cca_common.query_blocks_for_keys(k0 + kb * bk, bk, bq, g, w, L // bq)
            assert _expand(shard, m0 // bq) == _expand(whole, keep=own_q)
        for cb in range(n_core):
            shard = cca_common.query_blocks_for_cores(cb * bk, bk, bq, g, w, Ls // bq,
                                                      query_start=m0)
            whole = cca_common.query_blocks_for_cores(cb * bk, bk, bq, g, w, L // bq)
            assert _expand(shard, m0 // bq) == _expand(whole, keep=own_q)
