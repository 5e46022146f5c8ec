"""Forward Pallas kernel of CCA attention (flash-attention-2 style, one fused softmax).

Grid: (query blocks, B, H). The program for query block [m0, m0 + BM) of head h

1. loops over the core blocks j0 < c(m0 + BM - 1) (dynamic trip count; no loop when C = 0),
2. then over the raw key blocks from the one holding c(m0) * g up to the one holding
   m0 + BM - 1 (dynamic bounds; every skipped block holds no visible key),

keeping the online-softmax state (running max, running sum, unnormalised output) in float32
and in the base-2 domain. It writes the output and the base-2 log-sum-exp
`lse2 = log2(sum_j exp2(s_j))` (float32, [B, H, L]) that the backward kernels reuse.

Each loop is split into segments (cca_common.core_blocks / raw_key_blocks): the blocks in
which every (query, key) pair is visible (core blocks below c(m0); raw blocks inside
[c(m0 + BM - 1) * g, m0]) run without a mask; only the boundary blocks build one.

Non-finite values reach only the rows that see them (as in `cca_jax.reference`): in a
boundary block a masked pair has probability 0, and 0 * NaN would still be NaN, so there the
value rows holding a NaN / Inf enter the product as zeros and the query rows that see one of
them are remembered and written as NaN. Blocks without a mask are seen whole by every row.
That bookkeeping doubled the kernel's time at 2K-8K (H200, 2026-12-04), so it runs only when
the values hold a non-finite number at all: the wrapper passes one flag (any non-finite value
in v or core_v, one pass over them) and each program branches once on it, into one of two
copies of its loops. Without a non-finite value the bookkeeping changes nothing, so both
copies give the same bits.

A shard of a longer sequence (`Static.q_offset`, `kv_halo`; cca_jax.context): query row t is
position q0 + t, key row i position q0 - kv_halo + i. The loops are the same, in global
positions: the core blocks up to c(last row), the raw key rows from the one at c(first row)
* g to the one at the last row: about (w + g + BM) / BN raw blocks whatever the halo holds,
none of them at a negative (dummy) position. The whole sequence (q0 = kv_halo = 0) keeps the
original code (cca_common.origins gives None there).
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from cca_kernels.cca_common import (LOG2E, MASK_VALUE, Static, block_loops, core_blocks, core_mask,
                                    dot, iota, offset_input, origins, out_struct, raw_key_blocks, raw_mask,
                                    row_visibility, shift)


def _nonfinite_bookkeeping(mask, seen, values):
    """Zero the value rows holding a NaN / Inf and remember the rows of `mask` that see one."""
    # [block_k]; a float max, since Triton lowers no boolean reduction.
    bad = jnp.max(jnp.where(jnp.isfinite(values), 0.0, 1.0), axis=1) > 0
    seen = jnp.maximum(seen, jnp.max(jnp.where(mask & bad[None, :], 1.0, 0.0), axis=1))
    return seen, jnp.where(bad[:, None], jnp.zeros((), values.dtype), values)


def _online_softmax_step(carry, scores, mask, values, exact, bookkeeping):
    """One key block of the online softmax; `scores` already scaled to base 2; mask None for
    a block whose keys are all visible to all rows. `seen` (float32 0/1 per row) records
    the rows that see a non-finite value of a masked block; with `bookkeeping` False (no
    value is non-finite) that is skipped: it would change nothing."""
    acc, m_prev, l_prev, seen = carry
    if mask is not None:
        scores = jnp.where(mask, scores, MASK_VALUE)
        if bookkeeping:
            seen, values = _nonfinite_bookkeeping(mask, seen, values)
    m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1))
    correction = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(scores - m_next[:, None])
    l_next = correction * l_prev + jnp.sum(p, axis=1)
    acc = correction[:, None] * acc + dot(p.astype(values.dtype), values, exact=exact)
    return acc, m_next, l_next, seen


def _fwd_kernel(*refs, st: Static, n_core_blocks: int):
    refs = list(refs)
    flag_ref = refs.pop(0)
    off_ref = refs.pop(0) if st.traced_offset else None
    if st.has_core:
        q_ref, k_ref, v_ref, ck_ref, cv_ref, o_ref, lse_ref = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    nonfinite = jnp.max(flag_ref[...]) > 0
    g, w = st.group_size, st.window_size
    bq, bk = st.blocks.block_q, st.blocks.block_k
    exact = st.exact_f32
    q_pos0, k_pos0 = origins(st, off_ref)   # None, None: the whole sequence

    m0 = shift(pl.program_id(0) * bq, q_pos0)   # position of the block's first query
    rows = iota(m0, bq)
    counts, first = row_visibility(rows, g, w)   # c(m) and c(m) * g per row
    q = q_ref[...]
    head_dim = q.shape[-1]

    def attend(bookkeeping):
        carry = (jnp.zeros((bq, head_dim), jnp.float32),
                 jnp.full((bq,), -jnp.inf, jnp.float32),
                 jnp.zeros((bq,), jnp.float32),
                 jnp.zeros((bq,), jnp.float32))
        if st.has_core:
            def core_body(masked):
                def body(jb, carry):
                    j0 = pl.multiple_of(jb * bk, bk)
                    kc = ck_ref[pl.ds(j0, bk), :]
                    vc = cv_ref[pl.ds(j0, bk), :]
                    scores = dot(q, kc, trans_b=True, exact=exact) * st.qk_scale
                    mask = core_mask(counts, iota(j0, bk)) if masked else None
                    return _online_softmax_step(carry, scores, mask, vc, exact, bookkeeping)
                return body

            carry = block_loops(core_blocks(m0, bq, bk, g, w, n_core_blocks), core_body,
                                carry)

        def raw_body(masked):
            def body(kb, carry):
                n0 = pl.multiple_of(kb * bk, bk)
                kr = k_ref[pl.ds(n0, bk), :]
                vr = v_ref[pl.ds(n0, bk), :]
                scores = dot(q, kr, trans_b=True, exact=exact) * st.qk_scale
                mask = raw_mask(rows, first, iota(shift(n0, k_pos0), bk)) if masked else None
                return _online_softmax_step(carry, scores, mask, vr, exact, bookkeeping)
            return body

        return block_loops(raw_key_blocks(m0, bq, bk, g, w, key_start=k_pos0), raw_body,
                           carry)

    # One branch per program, two copies of the loops: the boundary blocks' bookkeeping only
    # where some value is non-finite (a branch inside every boundary block cost 7-12% more).
    acc, m_i, l_i, seen = lax.cond(nonfinite, lambda: attend(True), lambda: attend(False))

    # Every query (padded ones included) sees at least its own raw key, so l_i >= 1.
    out = jnp.where(seen[:, None] > 0, jnp.nan, acc / l_i[:, None])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = m_i + jnp.log(l_i) * LOG2E


def cca_forward(q, k, v, core_k, core_v, st: Static, offset=None):
    """Padded inputs: q [B, Lp, H, Dp], k/v [B, kv_halo + Lp, Hkv, Dp], core [B, Cp, H, Dp];
    offset: the int32[16] query offset when it is traced (st.q_offset None), else None.

    Returns (out [B, Lp, H, Dp] in q.dtype, lse2 [B, H, Lp] float32).
    """
    B, Lp, H, Dp = q.shape
    Lk = k.shape[1]
    bq, bk = st.blocks.block_q, st.blocks.block_k
    r = st.ratio
    n_core_blocks = core_k.shape[1] // bk if st.has_core else 0

    full_kv = pl.BlockSpec((None, Lk, None, Dp), lambda i, b, h: (b, 0, lax.div(h, r), 0))
    q_block = pl.BlockSpec((None, bq, None, Dp), lambda i, b, h: (b, i, h, 0))
    # One int32 flag (a 16-wide vector: a Triton-friendly tile): does any value that a
    # boundary block can hold fail isfinite?
    nonfinite = ~jnp.isfinite(v).all()
    if st.has_core:
        nonfinite = nonfinite | ~jnp.isfinite(core_v).all()
    flag = jnp.broadcast_to(nonfinite.astype(jnp.int32), (16,))
    in_specs = [pl.BlockSpec((16,), lambda i, b, h: (0,))]
    args = [flag]
    if st.traced_offset:
        in_specs.append(offset_input())
        args.append(offset)
    in_specs += [q_block, full_kv, full_kv]
    args += [q, k, v]
    if st.has_core:
        Cp = core_k.shape[1]
        full_core = pl.BlockSpec((None, Cp, None, Dp), lambda i, b, h: (b, 0, h, 0))
        in_specs += [full_core, full_core]
        args += [core_k, core_v]

    kernel = functools.partial(_fwd_kernel, st=st, n_core_blocks=n_core_blocks)
    out, lse = pl.pallas_call(
        kernel,
        grid=(Lp // bq, B, H),
        in_specs=in_specs,
        out_specs=[q_block,
                   pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
        out_shape=[out_struct(q.shape, q.dtype, *args),
                   out_struct((B, H, Lp), jnp.float32, *args)],
        compiler_params=plgpu.CompilerParams(num_warps=st.blocks.num_warps,
                                             num_stages=st.blocks.num_stages),
        interpret=st.interpret,
        name="cca_forward",
    )(*args)
    return out, lse
