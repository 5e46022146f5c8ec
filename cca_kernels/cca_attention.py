"""CCA attention (docs/cca.md §2-3) as Pallas kernels with a Pallas backward pass.

`cca_attention_pallas(q, k, v, core_k, core_v, ...)` computes, for every query m and query
head h, ONE softmax over

    [ core tokens j < c(m)      from core_k / core_v  ([B, C, H, d], per query head) ;
      raw keys c(m)*g <= n <= m from k / v            ([B, L, Hkv, d], head h // r)   ]

with c(m) = visible_core_count(m, g, w). The pooling that produces core_k / core_v stays in
jnp and is composed by the caller (gradients reach q, k, v through it by ordinary autodiff):

    core_k, core_v = pool_core_tokens(q, k, v, group_size=g, scale=s,
                                      num_groups=visible_core_count(L - 1, g, w))
    out = cca_attention_pallas(q, k, v, core_k, core_v, group_size=g, window_size=w, scale=s)

The op is a `jax.custom_vjp`; its backward returns (dq, dk, dv, dcore_k, dcore_v), all from
Pallas kernels (see cca_fwd.py and cca_bwd.py for the kernel design).

A shard of a longer sequence (context parallelism, cca_jax.context) passes `query_offset`, the
global position of its first query (an int, or a traced int32 scalar such as
`lax.axis_index(...) * L`), and keys/values with `Lk - L` rows before its own (the halo): key
row i is position query_offset - (Lk - L) + i, core token j is group j of the whole sequence.
Halo rows at negative positions (before the sequence) are never visible: any values do. The
kernels then visit only the blocks holding a visible pair in global positions (cca_common).

Padding: L is padded to a multiple of every tile, C to a multiple of every core tile, and the
head dim to a power of 2 (>= 16), all with zeros, in this wrapper; a halo is padded at its
front to a multiple of every tile (rows before the halo: no query of the shard sees them), so
that query blocks and key blocks line up as in the whole sequence. Padded keys n >= L are never
visible to real queries (n <= m < L), padded core tokens j >= C never either (c(m) <= C); padded
query rows always see at least their own (zero) key, so their log-sum-exp is finite, and their
output cotangent is zero (the VJP of the final slice), so they contribute exactly nothing.
"""
from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp

from cca_kernels.cca_bwd import cca_backward_dcore, cca_backward_dkv, cca_backward_dq
from cca_kernels.cca_common import SUPPORTED_DTYPES, BlockSizes, Static, resolve_block_sizes
from cca_kernels.cca_fwd import cca_forward
from cca_kernels.visibility import visible_core_count

__all__ = ["cca_attention_pallas", "BlockSizes"]


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _next_power_of_2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _check_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_offset(query_offset, L, Lk, C, group_size, window_size):
    """An int query offset is checked here; a traced one is the caller's promise."""
    if isinstance(query_offset, bool):
        raise TypeError("query_offset must be an int or an int32 scalar array, got a bool")
    if isinstance(query_offset, numbers.Integral):
        m0, halo = int(query_offset), Lk - L
        if m0 < 0:
            raise ValueError(f"query_offset must be >= 0, got {m0}")
        first = visible_core_count(m0, group_size, window_size) * group_size
        if m0 - halo > first:
            raise ValueError(f"the query at position {m0} sees raw keys from position {first} "
                             f"on, but k/v start at position {m0 - halo} ({halo} halo rows "
                             f"before the queries' own keys)")
        needed = visible_core_count(m0 + L - 1, group_size, window_size)
        if C < needed:
            raise ValueError(f"core_k/core_v hold {C} core tokens but the last query (position "
                             f"{m0 + L - 1}) sees visible_core_count(...) = {needed}")
        return
    dtype = getattr(query_offset, "dtype", None)
    if getattr(query_offset, "shape", None) != () or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"query_offset must be an int or an integer scalar array, got "
                        f"{type(query_offset).__name__} {getattr(query_offset, 'shape', '')} "
                        f"{dtype or ''}")


def _check_args(q, k, v, core_k, core_v, group_size, window_size, scale):
    _check_int("group_size", group_size)
    _check_int("window_size", window_size)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (
            scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    for name, x in (("q", q), ("k", k), ("v", v), ("core_k", core_k), ("core_v", core_v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be 4-D, got shape {getattr(x, 'shape', None)}")
    if jnp.dtype(q.dtype) not in SUPPORTED_DTYPES:
        raise TypeError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if core_k.dtype != core_v.dtype or not jnp.issubdtype(core_k.dtype, jnp.floating):
        raise TypeError(f"core_k and core_v must share one floating dtype, got "
                        f"{core_k.dtype} and {core_v.dtype}")
    B, L, H, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    if k.shape[0] != B or k.shape[1] < L or k.shape[3] != d:
        raise ValueError(f"k must be [B, Lk, Hkv, d] = [{B}, Lk >= {L}, Hkv, {d}], got "
                         f"{k.shape}")
    Hkv = k.shape[2]
    if B < 1 or L < 1 or H < 1 or Hkv < 1 or d < 1:
        raise ValueError(f"batch, length, heads and head_dim must all be >= 1, got q "
                         f"{q.shape} and k {k.shape}")
    if H % Hkv:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the number of "
                         f"key/value heads ({Hkv})")
    if core_k.shape != core_v.shape:
        raise ValueError(f"core_k and core_v must have the same shape, got {core_k.shape} and "
                         f"{core_v.shape}")
    if core_k.shape[0] != B or core_k.shape[2:] != (H, d):
        raise ValueError(f"core_k must be [B, C, H, d] = [{B}, C, {H}, {d}], got {core_k.shape}")


def cca_attention_pallas(q, k, v, core_k, core_v, *, group_size: int, window_size: int,
                         scale: float, interpret: bool = False, block_sizes=None,
                         allow_tf32: bool = False, query_offset=0):
    """CCA attention given the core tokens, as Pallas kernels (Triton on GPU).

    Args:
      q: [B, L, H, d] queries (after RoPE); float32, bfloat16 or float16.
      k, v: [B, Lk, Hkv, d], same dtype, H % Hkv == 0, Lk >= L: the queries' own keys are the
        last L rows; the Lk - L rows before them (a halo, only with a query_offset) are the
        keys at the positions just before the first query.
      core_k, core_v: [B, C, H, d] core tokens per query head (any float dtype; cast to q's),
        C >= visible_core_count(query_offset + L - 1, g, w); tokens beyond that are never
        visible.
      group_size, window_size: g >= 1, w >= 1 (any w, any L, L < w included).
      scale: softmax scale.
      interpret: run the same kernels in the Pallas interpreter (CPU).
      block_sizes: None (table by GPU generation), a `BlockSizes`, or a dict of its fields.
      allow_tf32: float32 inputs only: let Triton use TF32 for the dots (faster, ~1e-3
        relative error). Default False: full float32 products.
      query_offset: global position of q's first row: an int >= 0 (checked: the halo holds
        every key the queries see, C every core token), or a traced integer scalar (the
        caller's promise; one compiled kernel for every shard). Key row i of k / v is
        position query_offset - (Lk - L) + i; rows at negative positions are never visible.
        0 with Lk == L (the default): the whole sequence, the kernels' original code.
    Returns:
      [B, L, H, d] in q.dtype.
    """
    _check_args(q, k, v, core_k, core_v, group_size, window_size, scale)
    B, L, H, d = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    C = core_k.shape[1]
    _check_offset(query_offset, L, Lk, C, group_size, window_size)
    blocks = resolve_block_sizes(block_sizes, d, q.dtype, L, interpret=interpret)

    Lp = _round_up(L, blocks.seq_multiple)
    Dp = max(16, _next_power_of_2(d))
    Cp = _round_up(C, blocks.core_multiple) if C > 0 else 0
    # The halo padded at its front to whole tiles: query row t is key row kv_halo + t.
    kv_halo = _round_up(Lk - L, blocks.seq_multiple)

    def pad(x, length, front=0):
        return jnp.pad(x, [(0, 0), (front, length - front - x.shape[1]), (0, 0), (0, Dp - d)])

    traced = not isinstance(query_offset, numbers.Integral)
    st = Static(group_size=int(group_size), window_size=int(window_size), scale=float(scale),
                ratio=H // Hkv, has_core=C > 0, blocks=blocks, interpret=bool(interpret),
                exact_f32=not allow_tf32, q_offset=None if traced else int(query_offset),
                kv_halo=kv_halo)
    offset = (jnp.broadcast_to(jnp.asarray(query_offset, jnp.int32), (16,)) if traced
              else None)
    front = kv_halo - (Lk - L)
    out = _cca(pad(q, Lp), pad(k, kv_halo + Lp, front), pad(v, kv_halo + Lp, front),
               pad(core_k.astype(q.dtype), Cp), pad(core_v.astype(q.dtype), Cp), offset, st)
    return out[:, :L, :, :d]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _cca(q, k, v, core_k, core_v, offset, st: Static):
    return cca_forward(q, k, v, core_k, core_v, st, offset)[0]


def _cca_fwd(q, k, v, core_k, core_v, offset, st: Static):
    out, lse = cca_forward(q, k, v, core_k, core_v, st, offset)
    return out, (q, k, v, core_k, core_v, offset, out, lse)


def _cca_bwd(st: Static, residuals, dout):
    q, k, v, core_k, core_v, offset, out, lse = residuals
    dout = dout.astype(q.dtype)
    # delta[b, h, m] = sum_d out * dout, float32, [B, H, Lp] like lse.
    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)
    delta = jnp.transpose(delta, (0, 2, 1))
    dq = cca_backward_dq(q, k, v, core_k, core_v, dout, lse, delta, st, offset)
    dk, dv = cca_backward_dkv(q, k, v, dout, lse, delta, st, offset)
    if st.has_core:
        dcore_k, dcore_v = cca_backward_dcore(q, core_k, core_v, dout, lse, delta, st, offset)
    else:
        dcore_k, dcore_v = jnp.zeros_like(core_k), jnp.zeros_like(core_v)
    # The offset is an integer: no cotangent.
    return dq, dk, dv, dcore_k, dcore_v, None


_cca.defvjp(_cca_fwd, _cca_bwd)
