"""Backward Pallas kernels of CCA attention.

With p = exp2(s - lse2) recomputed from the forward's log-sum-exp and
delta[m] = sum_d out[m, d] * dout[m, d] (computed in jnp), the softmax gradient is
ds = p * (dout . v - delta), and

- dq kernel, grid (query blocks, B, H): loops over the same core and raw key blocks as the
  forward; dq = scale * (sum over core blocks ds @ core_k + sum over raw blocks ds @ k);
- dk/dv kernel, grid (key blocks, B, Hkv): for its raw key block [n0, n0 + BN) it loops over
  the r query heads of its KV group and, for each, over the query blocks that can see the
  block: n0 <= m <= (n // g + 1) * g + w - 2. GQA needs no repeated K/V and no per-query-head
  dk: the r heads accumulate into one float32 tile;
- dcore kernel, grid (core blocks, B, H): for core block [j0, j0 + BC) it loops over the
  query blocks from the first one with c(m) > j0 (m >= (j0 + 1) * g + w - 1) to the end.

Every block loop is split like the forward's: only boundary blocks, where some pair is
invisible, build a mask (cca_common's segment helpers).
Masked scores are replaced by a huge negative finite value before exp2, so masked (and padded)
entries give p == 0 exactly and contribute nothing, and no inf/NaN can arise.

A shard of a longer sequence (`Static.q_offset`, `kv_halo`, as in cca_fwd.py): the same loops
in global positions. The dk/dv grid covers the halo's key blocks too (their gradients go back
to the shard that owns them); a block whose keys no query of this shard sees (a halo row
before the sequence, or one too early for every query) has an empty query loop and writes
zeros. The dcore grid covers every core block; those past c(last query) loop over nothing.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from cca_kernels.cca_common import (MASK_VALUE, Static, block_loops, core_blocks, core_mask, dot,
                                    iota, offset_input, origins, out_struct,
                                    query_blocks_for_cores,
                                    query_blocks_for_keys, raw_key_blocks, raw_mask,
                                    row_visibility, shift)


def _probs(scores, mask, lse2):
    """p = exp2(s - lse2); masked entries exactly 0 (mask None: all entries visible)."""
    if mask is not None:
        scores = jnp.where(mask, scores, MASK_VALUE)
    return jnp.exp2(scores - lse2[:, None])


# --------------------------------------------------------------------------- dq

def _dq_kernel(*refs, st: Static, n_core_blocks: int):
    refs = list(refs)
    off_ref = refs.pop(0) if st.traced_offset else None
    if st.has_core:
        (q_ref, k_ref, v_ref, ck_ref, cv_ref, do_ref, lse_ref, delta_ref, dq_ref) = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref) = refs
    g, w = st.group_size, st.window_size
    bq, bk = st.blocks.block_q_dq, st.blocks.block_k_dq
    exact = st.exact_f32
    q_pos0, k_pos0 = origins(st, off_ref)

    m0 = shift(pl.program_id(0) * bq, q_pos0)
    rows = iota(m0, bq)
    counts, first = row_visibility(rows, g, w)
    q = q_ref[...]
    do = do_ref[...]
    lse2 = lse_ref[...]
    delta = delta_ref[...]

    def accumulate(dq, keys, values, mask):
        scores = dot(q, keys, trans_b=True, exact=exact) * st.qk_scale
        p = _probs(scores, mask, lse2)
        dp = dot(do, values, trans_b=True, exact=exact)
        ds = p * (dp - delta[:, None])
        return dq + dot(ds.astype(keys.dtype), keys, exact=exact)

    dq = jnp.zeros(q.shape, jnp.float32)
    if st.has_core:
        def core_body(masked):
            def body(jb, dq):
                j0 = pl.multiple_of(jb * bk, bk)
                mask = core_mask(counts, iota(j0, bk)) if masked else None
                return accumulate(dq, ck_ref[pl.ds(j0, bk), :], cv_ref[pl.ds(j0, bk), :], mask)
            return body

        dq = block_loops(core_blocks(m0, bq, bk, g, w, n_core_blocks), core_body, dq)

    def raw_body(masked):
        def body(kb, dq):
            n0 = pl.multiple_of(kb * bk, bk)
            mask = raw_mask(rows, first, iota(shift(n0, k_pos0), bk)) if masked else None
            return accumulate(dq, k_ref[pl.ds(n0, bk), :], v_ref[pl.ds(n0, bk), :], mask)
        return body

    dq = block_loops(raw_key_blocks(m0, bq, bk, g, w, key_start=k_pos0), raw_body, dq)
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _with_offset(st: Static, offset, in_specs, args):
    """The traced query offset goes first, where the kernels pop it."""
    if st.traced_offset:
        return [offset_input(), *in_specs], [offset, *args]
    return in_specs, args


def cca_backward_dq(q, k, v, core_k, core_v, dout, lse, delta, st: Static, offset=None):
    B, Lp, H, Dp = q.shape
    Lk = k.shape[1]
    bq, bk = st.blocks.block_q_dq, st.blocks.block_k_dq
    r = st.ratio
    q_block = pl.BlockSpec((None, bq, None, Dp), lambda i, b, h: (b, i, h, 0))
    row_block = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    full_kv = pl.BlockSpec((None, Lk, None, Dp), lambda i, b, h: (b, 0, lax.div(h, r), 0))
    in_specs = [q_block, full_kv, full_kv]
    args = [q, k, v]
    n_core_blocks = 0
    if st.has_core:
        Cp = core_k.shape[1]
        n_core_blocks = Cp // bk
        full_core = pl.BlockSpec((None, Cp, None, Dp), lambda i, b, h: (b, 0, h, 0))
        in_specs += [full_core, full_core]
        args += [core_k, core_v]
    in_specs += [q_block, row_block, row_block]
    args += [dout, lse, delta]
    in_specs, args = _with_offset(st, offset, in_specs, args)
    return pl.pallas_call(
        functools.partial(_dq_kernel, st=st, n_core_blocks=n_core_blocks),
        grid=(Lp // bq, B, H),
        in_specs=in_specs,
        out_specs=q_block,
        out_shape=out_struct(q.shape, q.dtype, *args),
        compiler_params=plgpu.CompilerParams(num_warps=st.blocks.num_warps_bwd,
                                             num_stages=st.blocks.num_stages_bwd),
        interpret=st.interpret,
        name="cca_backward_dq",
    )(*args)


# --------------------------------------------------------------------------- dk, dv

def _dkv_kernel(*refs, st: Static, n_q_blocks: int):
    refs = list(refs)
    off_ref = refs.pop(0) if st.traced_offset else None
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    g, w = st.group_size, st.window_size
    bq, bk = st.blocks.block_q_dkv, st.blocks.block_k_dkv
    exact = st.exact_f32
    q_pos0, k_pos0 = origins(st, off_ref)

    n0 = shift(pl.program_id(0) * bk, k_pos0)   # position of the block's first key
    cols = iota(n0, bk)
    k = k_ref[...]
    v = v_ref[...]
    segments = query_blocks_for_keys(n0, bk, bq, g, w, n_q_blocks, query_start=q_pos0)

    def head_body(head, carry):
        def query_body(masked):
            def body(qb, carry):
                dk, dv = carry
                m0 = pl.multiple_of(qb * bq, bq)
                q = q_ref[pl.ds(m0, bq), head, :]
                do = do_ref[pl.ds(m0, bq), head, :]
                lse2 = lse_ref[head, pl.ds(m0, bq)]
                delta = delta_ref[head, pl.ds(m0, bq)]
                mask = None
                if masked:
                    rows = iota(shift(m0, q_pos0), bq)
                    mask = raw_mask(rows, row_visibility(rows, g, w)[1], cols)
                scores = dot(q, k, trans_b=True, exact=exact) * st.qk_scale
                p = _probs(scores, mask, lse2)
                dv = dv + dot(p.astype(do.dtype), do, trans_a=True, exact=exact)
                dp = dot(do, v, trans_b=True, exact=exact)
                ds = p * (dp - delta[:, None])
                dk = dk + dot(ds.astype(q.dtype), q, trans_a=True, exact=exact)
                return dk, dv
            return body

        return block_loops(segments, query_body, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, st.ratio, head_body, (zeros, zeros))
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def cca_backward_dkv(q, k, v, dout, lse, delta, st: Static, offset=None):
    B, Lp, H, Dp = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    r = st.ratio
    bq, bk = st.blocks.block_q_dkv, st.blocks.block_k_dkv
    # All r query heads of KV head `hk` (heads hk * r .. hk * r + r - 1), whole sequence.
    group_q = pl.BlockSpec((None, Lp, r, Dp), lambda j, b, hk: (b, 0, hk, 0))
    group_rows = pl.BlockSpec((None, r, Lp), lambda j, b, hk: (b, hk, 0))
    kv_block = pl.BlockSpec((None, bk, None, Dp), lambda j, b, hk: (b, j, hk, 0))
    in_specs, args = _with_offset(st, offset,
                                  [group_q, kv_block, kv_block, group_q, group_rows, group_rows],
                                  [q, k, v, dout, lse, delta])
    return pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, n_q_blocks=Lp // bq),
        grid=(Lk // bk, B, Hkv),
        in_specs=in_specs,
        out_specs=[kv_block, kv_block],
        out_shape=[out_struct(k.shape, k.dtype, *args), out_struct(v.shape, v.dtype, *args)],
        compiler_params=plgpu.CompilerParams(num_warps=st.blocks.num_warps_bwd,
                                             num_stages=st.blocks.num_stages_bwd),
        interpret=st.interpret,
        name="cca_backward_dkv",
    )(*args)


# --------------------------------------------------------------------------- dcore_k, dcore_v

def _dcore_kernel(*refs, st: Static, n_q_blocks: int):
    refs = list(refs)
    off_ref = refs.pop(0) if st.traced_offset else None
    q_ref, ck_ref, cv_ref, do_ref, lse_ref, delta_ref, dck_ref, dcv_ref = refs
    g, w = st.group_size, st.window_size
    bq, bc = st.blocks.block_q_dkv, st.blocks.block_k_dkv
    exact = st.exact_f32
    q_pos0, _ = origins(st, off_ref)

    j0 = pl.program_id(0) * bc
    cols = iota(j0, bc)
    kc = ck_ref[...]
    vc = cv_ref[...]

    def query_body(masked):
        def body(qb, carry):
            dkc, dvc = carry
            m0 = pl.multiple_of(qb * bq, bq)
            q = q_ref[pl.ds(m0, bq), :]
            do = do_ref[pl.ds(m0, bq), :]
            lse2 = lse_ref[pl.ds(m0, bq)]
            delta = delta_ref[pl.ds(m0, bq)]
            mask = (core_mask(row_visibility(iota(shift(m0, q_pos0), bq), g, w)[0], cols)
                    if masked else None)
            scores = dot(q, kc, trans_b=True, exact=exact) * st.qk_scale
            p = _probs(scores, mask, lse2)
            dvc = dvc + dot(p.astype(do.dtype), do, trans_a=True, exact=exact)
            dp = dot(do, vc, trans_b=True, exact=exact)
            ds = p * (dp - delta[:, None])
            dkc = dkc + dot(ds.astype(q.dtype), q, trans_a=True, exact=exact)
            return dkc, dvc
        return body

    zeros = jnp.zeros(kc.shape, jnp.float32)
    segments = query_blocks_for_cores(j0, bc, bq, g, w, n_q_blocks, query_start=q_pos0)
    dkc, dvc = block_loops(segments, query_body, (zeros, zeros))
    dck_ref[...] = (dkc * st.scale).astype(dck_ref.dtype)
    dcv_ref[...] = dvc.astype(dcv_ref.dtype)


def cca_backward_dcore(q, core_k, core_v, dout, lse, delta, st: Static, offset=None):
    B, Lp, H, Dp = q.shape
    Cp = core_k.shape[1]
    bq, bc = st.blocks.block_q_dkv, st.blocks.block_k_dkv
    full_q = pl.BlockSpec((None, Lp, None, Dp), lambda j, b, h: (b, 0, h, 0))
    full_rows = pl.BlockSpec((None, None, Lp), lambda j, b, h: (b, h, 0))
    core_block = pl.BlockSpec((None, bc, None, Dp), lambda j, b, h: (b, j, h, 0))
    in_specs, args = _with_offset(st, offset,
                                  [full_q, core_block, core_block, full_q, full_rows, full_rows],
                                  [q, core_k, core_v, dout, lse, delta])
    return pl.pallas_call(
        functools.partial(_dcore_kernel, st=st, n_q_blocks=Lp // bq),
        grid=(Cp // bc, B, H),
        in_specs=in_specs,
        out_specs=[core_block, core_block],
        out_shape=[out_struct(core_k.shape, core_k.dtype, *args),
                   out_struct(core_v.shape, core_v.dtype, *args)],
        compiler_params=plgpu.CompilerParams(num_warps=st.blocks.num_warps_bwd,
                                             num_stages=st.blocks.num_stages_bwd),
        interpret=st.interpret,
        name="cca_backward_dcore",
    )(*args)
