"""Decode attention: one new query per sequence against [visible core tokens ; raw window].

This is the attention of one decode step of the CCA cache (docs/cca.md §5). For each
sequence b and query head h (GQA: h uses key/value head h // r) it computes ONE softmax over

    core tokens j < core_count[b]   from core_k / core_v  ([B, C, H, d], per query head)
    raw keys n with raw_valid[b, n] from raw_k / raw_v    ([B, R, Hkv, d], per KV head)

Which slots are visible is decided by the caller (the cache applies `cca_kernels.visibility`);
here the core tokens are a prefix of length `core_count` and the raw slots carry a mask, so
the same function is also ordinary full-cache decode attention (no core, raw = the whole
cache, mask = "position <= t").

Two implementations of the same function:

- `decode_attention_reference`: dense jnp (float32 softmax, full-precision float32 products).
  The CPU path of the cache, and the oracle of the kernel tests.
- `decode_attention_pallas`: a split-K ("flash-decoding") Pallas kernel. Grid
  (B, H, core splits + raw splits); each program streams one contiguous chunk of core tokens
  (only the blocks below core_count: a short context costs nothing for the empty chunks) or of
  raw slots, keeps an online softmax (running max, running sum, unnormalised output) in
  float32, and writes its partial result; a log-sum-exp merge in jnp combines the chunks.
  Triton on a GPU; `interpret=True` runs the same kernel on the CPU.

Imports jax only.
"""
from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

# Finite "minus infinity": exp(MASK_VALUE - x) == 0 for any finite x, and max/exp never meet
# inf - inf. The same constant as the prefill kernels.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_HIGHEST = lax.Precision.HIGHEST


def _check_args(q, raw_k, raw_v, raw_valid, core_k, core_v, core_count):
    if getattr(q, "ndim", None) != 3:
        raise ValueError(f"q must be [batch, heads, head_dim], got shape "
                         f"{getattr(q, 'shape', None)}")
    B, H, d = q.shape
    for name, x in (("raw_k", raw_k), ("raw_v", raw_v)):
        if getattr(x, "ndim", None) != 4 or x.shape[0] != B or x.shape[3] != d:
            raise ValueError(f"{name} must be [B, R, Hkv, d] = [{B}, R, Hkv, {d}], got "
                             f"{getattr(x, 'shape', None)}")
    if raw_k.shape != raw_v.shape:
        raise ValueError(f"raw_k and raw_v must have the same shape, got {raw_k.shape} and "
                         f"{raw_v.shape}")
    B_, R, Hkv, _ = raw_k.shape
    if R < 1 or Hkv < 1 or H % Hkv:
        raise ValueError(f"need R >= 1 raw slots and H ({H}) a multiple of Hkv ({Hkv}), got "
                         f"raw_k {raw_k.shape}")
    if getattr(raw_valid, "shape", None) != (B, R):
        raise ValueError(f"raw_valid must be [B, R] = [{B}, {R}], got "
                         f"{getattr(raw_valid, 'shape', None)}")
    if (core_k is None) != (core_v is None) or (core_k is None) != (core_count is None):
        raise ValueError("core_k, core_v and core_count must be given together (or none)")
    if core_k is not None:
        if getattr(core_k, "ndim", None) != 4 or core_k.shape[0] != B or core_k.shape[2:] != (
                H, d):
            raise ValueError(f"core_k must be [B, C, H, d] = [{B}, C, {H}, {d}], got "
                             f"{getattr(core_k, 'shape', None)}")
        if core_v.shape != core_k.shape:
            raise ValueError(f"core_k and core_v must have the same shape, got {core_k.shape} "
                             f"and {core_v.shape}")
        if getattr(core_count, "shape", None) != (B,):
            raise ValueError(f"core_count must be [B] = [{B}], got "
                             f"{getattr(core_count, 'shape', None)}")


def _scale(q, scale):
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (
            scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    return float(scale)


def _mm(equation, a, b):
    precision = _HIGHEST if a.dtype == jnp.float32 else None
    return jnp.einsum(equation, a, b, precision=precision, preferred_element_type=jnp.float32)


def decode_attention_reference(q, raw_k, raw_v, raw_valid, core_k=None, core_v=None,
                               core_count=None, *, scale: float | None = None):
    """Dense jnp decode attention. Shapes as in the module docstring; returns [B, H, d] in
    q.dtype. Scores and softmax in float32; probabilities cast to the value dtype for the
    value product (no change for float32)."""
    _check_args(q, raw_k, raw_v, raw_valid, core_k, core_v, core_count)
    scale = _scale(q, scale)
    B, H, d = q.shape
    R, Hkv = raw_k.shape[1], raw_k.shape[2]
    r = H // Hkv
    q4 = q.reshape(B, Hkv, r, d)
    raw_scores = _mm("bkrd,bnkd->bkrn", q4, raw_k) * scale
    raw_scores = jnp.where(raw_valid.astype(bool)[:, None, None, :], raw_scores, MASK_VALUE)
    parts = [raw_scores]
    if core_k is not None and core_k.shape[1]:
        C = core_k.shape[1]
        core_scores = _mm("bkrd,bckrd->bkrc", q4, core_k.reshape(B, C, Hkv, r, d)) * scale
        core_visible = jnp.arange(C)[None, :] < core_count[:, None]
        parts.insert(0, jnp.where(core_visible[:, None, None, :], core_scores, MASK_VALUE))
    scores = jnp.concatenate(parts, axis=-1)
    probs = jax.nn.softmax(scores, axis=-1)
    # A masked slot has probability exactly 0 (whatever it holds, as long as it is finite).
    probs = probs.astype(raw_v.dtype)
    out = _mm("bkrn,bnkd->bkrd", probs[..., -R:], raw_v)
    if len(parts) == 2:
        C = core_k.shape[1]
        out = out + _mm("bkrc,bckrd->bkrd", probs[..., :C],
                        core_v.astype(raw_v.dtype).reshape(B, C, Hkv, r, d))
    return out.reshape(B, H, d).astype(q.dtype)


# ---------------------------------------------------------------------------------------
# The split-K Pallas kernel.


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def _plan(length: int, block: int, target_chunk: int, max_splits: int):
    """(block, n_splits, blocks_per_split) for streaming `length` slots.

    The block is a power of 2 no larger than the array (so the last block can be clamped
    inside it instead of reading out of bounds)."""
    block = min(block, _pow2_floor(length))
    n_blocks = -(-length // block)
    n_splits = max(1, min(max_splits, -(-length // max(block, target_chunk))))
    per_split = -(-n_blocks // n_splits)
    n_splits = -(-n_blocks // per_split)
    return block, n_splits, per_split


def _online_step(carry, q, keys, values, visible):
    """One block of the online softmax for one query row; q already scaled, float32."""
    acc, m_prev, l_prev = carry
    scores = jnp.sum(q[None, :] * keys.astype(jnp.float32), axis=1)        # [block]
    scores = jnp.where(visible, scores, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(scores))
    correction = jnp.exp(m_prev - m_next)
    p = jnp.where(visible, jnp.exp(scores - m_next), 0.0)
    l_next = correction * l_prev + jnp.sum(p)
    acc = correction * acc + jnp.sum(p[:, None] * values.astype(jnp.float32), axis=0)
    return acc, m_next, l_next


def _decode_kernel(*refs, has_core: bool, scale: float, core_plan, raw_plan, core_len: int,
                   raw_len: int):
    if has_core:
        q_ref, ck_ref, cv_ref, count_ref, rk_ref, rv_ref, valid_ref, o_ref, stats_ref = refs
    else:
        q_ref, rk_ref, rv_ref, valid_ref, o_ref, stats_ref = refs
    split = pl.program_id(2)
    q = q_ref[...].astype(jnp.float32) * scale
    d = q.shape[0]
    carry = (jnp.zeros((d,), jnp.float32), jnp.float32(MASK_VALUE), jnp.float32(0.0))
    n_core_splits = 0

    if has_core:
        block_c, n_core_splits, per_split_c = core_plan
        count = jnp.max(count_ref[...])
        lo = split * per_split_c
        hi = jnp.minimum(lo + per_split_c, lax.div(count + (block_c - 1), block_c))
        hi = jnp.where(split < n_core_splits, jnp.maximum(hi, lo), lo)

        def core_body(jb, carry):
            j0 = jb * block_c
            start = jnp.minimum(j0, core_len - block_c)   # last block clamped inside [0, C)
            index = start + lax.broadcasted_iota(jnp.int32, (block_c,), 0)
            visible = (index >= j0) & (index < count)
            return _online_step(carry, q, ck_ref[pl.ds(start, block_c), :],
                                cv_ref[pl.ds(start, block_c), :], visible)

        carry = lax.fori_loop(lo, hi, core_body, carry)

    block_r, n_raw_splits, per_split_r = raw_plan
    raw_split = split - n_core_splits
    lo = raw_split * per_split_r
    hi = jnp.minimum(lo + per_split_r, -(-raw_len // block_r))
    hi = jnp.where(raw_split >= 0, hi, lo)
    lo = jnp.maximum(lo, 0)
    hi = jnp.maximum(hi, lo)

    def raw_body(nb, carry):
        n0 = nb * block_r
        start = jnp.minimum(n0, raw_len - block_r)
        index = start + lax.broadcasted_iota(jnp.int32, (block_r,), 0)
        visible = (index >= n0) & (valid_ref[pl.ds(start, block_r)] != 0)
        return _online_step(carry, q, rk_ref[pl.ds(start, block_r), :],
                            rv_ref[pl.ds(start, block_r), :], visible)

    acc, m, l = lax.fori_loop(lo, hi, raw_body, carry)
    o_ref[...] = acc
    lane = lax.broadcasted_iota(jnp.int32, (2,), 0)
    stats_ref[...] = jnp.where(lane == 0, m, l)


def merge_partials(acc, stats):
    """Log-sum-exp merge of split partials: acc [B, H, S, d], stats [B, H, S, 2] (running max,
    running sum) -> [B, H, d] float32. Empty splits (max = MASK_VALUE, sum 0) weigh 0."""
    m, l = stats[..., 0], stats[..., 1]
    m_all = jnp.max(m, axis=-1, keepdims=True)
    weight = jnp.exp(m - m_all)
    return (jnp.sum(weight[..., None] * acc, axis=2)
            / jnp.sum(weight * l, axis=-1)[..., None])


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "block_k", "chunk",
                                             "max_splits", "num_warps", "num_stages"))
def _decode_pallas(q, raw_k, raw_v, raw_valid, core_k, core_v, core_count, *, scale,
                   interpret, block_k, chunk, max_splits, num_warps, num_stages):
    B, H, d = q.shape
    R, Hkv = raw_k.shape[1], raw_k.shape[2]
    r = H // Hkv
    has_core = core_k is not None and core_k.shape[1] > 0
    raw_plan = _plan(R, block_k, chunk, max_splits)
    core_plan = _plan(core_k.shape[1], block_k, chunk, max_splits) if has_core else None
    n_splits = raw_plan[1] + (core_plan[1] if has_core else 0)

    q_spec = pl.BlockSpec((None, None, d), lambda b, h, s: (b, h, 0))
    raw_spec = pl.BlockSpec((None, R, None, d), lambda b, h, s: (b, 0, lax.div(h, r), 0))
    valid_spec = pl.BlockSpec((None, R), lambda b, h, s: (b, 0))
    in_specs, args = [q_spec], [q]
    if has_core:
        C = core_k.shape[1]
        core_spec = pl.BlockSpec((None, C, None, d), lambda b, h, s: (b, 0, h, 0))
        in_specs += [core_spec, core_spec, pl.BlockSpec((None, 1), lambda b, h, s: (b, 0))]
        args += [core_k, core_v.astype(core_k.dtype),
                 core_count.astype(jnp.int32).reshape(B, 1)]
    in_specs += [raw_spec, raw_spec, valid_spec]
    args += [raw_k, raw_v, raw_valid.astype(jnp.int32)]

    kernel = functools.partial(_decode_kernel, has_core=has_core, scale=scale,
                               core_plan=core_plan, raw_plan=raw_plan,
                               core_len=core_k.shape[1] if has_core else 0, raw_len=R)
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    acc, stats = pl.pallas_call(
        kernel,
        grid=(B, H, n_splits),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, None, d), lambda b, h, s: (b, h, s, 0)),
                   pl.BlockSpec((None, None, None, 2), lambda b, h, s: (b, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, H, n_splits, d), jnp.float32),
                   jax.ShapeDtypeStruct((B, H, n_splits, 2), jnp.float32)],
        compiler_params=compiler_params,
        interpret=interpret,
        name="cca_decode_split_k",
    )(*args)
    return merge_partials(acc, stats).astype(q.dtype)


def decode_attention_pallas(q, raw_k, raw_v, raw_valid, core_k=None, core_v=None,
                            core_count=None, *, scale: float | None = None,
                            interpret: bool = False, block_k: int = 64, chunk: int = 512,
                            max_splits: int = 32, num_warps: int = 4, num_stages: int = 2):
    """Split-K Pallas decode attention; same function as `decode_attention_reference`.

    block_k: slots per loaded tile (a power of 2; shrunk for arrays shorter than it).
    chunk / max_splits: each split streams about `chunk` slots, at most `max_splits` splits
      for the core tokens and as many for the raw slots. The split count is fixed by the
      array capacities (static); blocks past core_count are skipped at run time.
    The head dim must be a power of 2 (Triton tiles); inputs are never padded here, since
    padding a cache would copy it at every step.
    """
    _check_args(q, raw_k, raw_v, raw_valid, core_k, core_v, core_count)
    scale = _scale(q, scale)
    d = q.shape[-1]
    if d & (d - 1):
        raise ValueError(f"decode_attention_pallas needs a power-of-2 head_dim, got {d}; use "
                         "decode_attention_reference")
    for name, value in (("block_k", block_k), ("chunk", chunk), ("max_splits", max_splits)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of 2, got {block_k}")
    if not interpret and jax.default_backend() != "gpu":
        raise ValueError("decode_attention_pallas needs a GPU backend (Triton); on "
                         f"{jax.default_backend()!r} pass interpret=True or use "
                         "decode_attention_reference")
    return _decode_pallas(q, raw_k, raw_v, raw_valid, core_k, core_v, core_count, scale=scale,
                          interpret=interpret, block_k=block_k, chunk=chunk,
                          max_splits=max_splits, num_warps=num_warps, num_stages=num_stages)
