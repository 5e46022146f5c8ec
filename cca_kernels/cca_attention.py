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

Padding: L is padded to a multiple of every tile, C to a multiple of every core tile, and the
head dim to a power of 2 (>= 16), all with zeros, in this wrapper. Padded keys n >= L are never
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
    if k.shape[:2] != (B, L) or k.shape[3] != d:
        raise ValueError(f"k must be [B, L, Hkv, d] = [{B}, {L}, Hkv, {d}], got {k.shape}")
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
    C = core_k.shape[1]
    if core_k.shape[0] != B or core_k.shape[2:] != (H, d):
        raise ValueError(f"core_k must be [B, C, H, d] = [{B}, C, {H}, {d}], got {core_k.shape}")
    needed = visible_core_count(L - 1, group_size, window_size)
    if C < needed:
        raise ValueError(f"core_k/core_v hold {C} core tokens but the last query sees "
                         f"visible_core_count(L - 1, g, w) = {needed}")


def cca_attention_pallas(q, k, v, core_k, core_v, *, group_size: int, window_size: int,
                         scale: float, interpret: bool = False, block_sizes=None,
                         allow_tf32: bool = False):
    """CCA attention given the core tokens, as Pallas kernels (Triton on GPU).

    Args:
      q: [B, L, H, d] queries (after RoPE); float32, bfloat16 or float16.
      k, v: [B, L, Hkv, d], same dtype, H % Hkv == 0.
      core_k, core_v: [B, C, H, d] core tokens per query head (any float dtype; cast to q's),
        C >= visible_core_count(L - 1, g, w); tokens beyond that are never visible.
      group_size, window_size: g >= 1, w >= 1 (any w, any L, L < w included).
      scale: softmax scale.
      interpret: run the same kernels in the Pallas interpreter (CPU).
      block_sizes: None (table by GPU generation), a `BlockSizes`, or a dict of its fields.
      allow_tf32: float32 inputs only: let Triton use TF32 for the dots (faster, ~1e-3
        relative error). Default False: full float32 products.
    Returns:
      [B, L, H, d] in q.dtype.
    """
    _check_args(q, k, v, core_k, core_v, group_size, window_size, scale)
    B, L, H, d = q.shape
    Hkv = k.shape[2]
    C = core_k.shape[1]
    blocks = resolve_block_sizes(block_sizes, d, q.dtype, L, interpret=interpret)

    Lp = _round_up(L, blocks.seq_multiple)
    Dp = max(16, _next_power_of_2(d))
    Cp = _round_up(C, blocks.core_multiple) if C > 0 else 0

    def pad(x, length):
        return jnp.pad(x, [(0, 0), (0, length - x.shape[1]), (0, 0), (0, Dp - d)])

    st = Static(group_size=int(group_size), window_size=int(window_size), scale=float(scale),
                ratio=H // Hkv, has_core=C > 0, blocks=blocks, interpret=bool(interpret),
                exact_f32=not allow_tf32)
    out = _cca(pad(q, Lp), pad(k, Lp), pad(v, Lp),
               pad(core_k.astype(q.dtype), Cp), pad(core_v.astype(q.dtype), Cp), st)
    return out[:, :L, :, :d]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _cca(q, k, v, core_k, core_v, st: Static):
    return cca_forward(q, k, v, core_k, core_v, st)[0]


def _cca_fwd(q, k, v, core_k, core_v, st: Static):
    out, lse = cca_forward(q, k, v, core_k, core_v, st)
    return out, (q, k, v, core_k, core_v, out, lse)


def _cca_bwd(st: Static, residuals, dout):
    q, k, v, core_k, core_v, out, lse = residuals
    dout = dout.astype(q.dtype)
    # delta[b, h, m] = sum_d out * dout, float32, [B, H, Lp] like lse.
    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)
    delta = jnp.transpose(delta, (0, 2, 1))
    dq = cca_backward_dq(q, k, v, core_k, core_v, dout, lse, delta, st)
    dk, dv = cca_backward_dkv(q, k, v, dout, lse, delta, st)
    if st.has_core:
        dcore_k, dcore_v = cca_backward_dcore(q, core_k, core_v, dout, lse, delta, st)
    else:
        dcore_k, dcore_v = jnp.zeros_like(core_k), jnp.zeros_like(core_v)
    return dq, dk, dv, dcore_k, dcore_v


_cca.defvjp(_cca_fwd, _cca_bwd)
