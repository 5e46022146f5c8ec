"""CCA attention in blocked jnp (the `"xla"` implementation): no `L x L` array anywhere.

Queries are processed in chunks of `chunk_size`. A chunk starting at `m0` sees the core
tokens `j < c(m0 + chunk - 1)` and raw keys from `c(m0) * g` to its last query, a span of at
most `chunk + w + g - 1` keys, so each chunk needs memory O(chunk * (L/g + w + chunk)).
Chunks run in a `lax.scan` whose body is rematerialised in the backward pass, so gradients
take the same memory. This is the fallback wherever no Pallas kernel applies; with no core
tokens and a window spanning the sequence it is also the memory-lean causal attention.

Non-finite values reach only the rows that see them (as in `cca_jax.reference`): the value
products run on `finite_or_zero` values, and the rows that see a NaN / Inf value are found
from the visibility rule (a prefix of core tokens, a contiguous raw range) in O(L) and set to
NaN. Value products of half-precision inputs keep their cotangent in float32
(`_weighted_values`), so the backward never rounds a large intermediate to the input dtype.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from cca_jax.reference import (compute_dtype, finite_or_zero, mask_nonfinite_values,
                               nonfinite_rows, pool_core_tokens)
from cca_kernels.visibility import visible_core_count

DEFAULT_CHUNK_SIZE = 512


def _einsum(equation, a, b):
    """Matrix product accumulated in float32 (full precision for float32 operands)."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    out_type = compute_dtype(jnp.result_type(a, b))
    return jnp.einsum(equation, a, b, precision=precision, preferred_element_type=out_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _weighted_values(equation, probs, values):
    """`probs` (compute dtype) times half-precision `values`: the probabilities are rounded to
    the value dtype for the product, as in flash attention; the result is float32.

    The custom backward keeps d(probs) = cotangent x values in float32: autodiff of the plain
    product would return it in the value dtype, where cotangent x values (~|dout| |v| d)
    overflows for |v| ~ 1e4 in float16 and the softmax backward turns the Inf into NaN.
    """
    return _einsum(equation, probs.astype(values.dtype), values)


def _weighted_values_fwd(equation, probs, values):
    return _weighted_values(equation, probs, values), (probs, values)


def _weighted_values_bwd(equation, residuals, cotangent):
    probs, values = residuals
    rounded = probs.astype(values.dtype).astype(probs.dtype)  # what the forward multiplied
    _, vjp = jax.vjp(functools.partial(jnp.einsum, equation,
                                       preferred_element_type=probs.dtype),
                     rounded, values.astype(probs.dtype))
    d_probs, d_values = vjp(cotangent.astype(probs.dtype))
    return d_probs, d_values.astype(values.dtype)


_weighted_values.defvjp(_weighted_values_fwd, _weighted_values_bwd)


def _value_product(equation, probs, values):
    """probs x values accumulated in float32; the custom backward only for narrower values
    (float32 and wider values take the plain full-precision product)."""
    if jnp.dtype(values.dtype) == jnp.dtype(probs.dtype):
        return _einsum(equation, probs, values)
    return _weighted_values(equation, probs, values)


def _rows_seeing_nonfinite(core_v, v, *, group_size, window_size, q_start=0, position0=0,
                           num_queries=None):
    """[B, Lq, H] True where query m sees a non-finite core token (j < c(m)) or raw value
    (c(m) * g <= n <= m). O(L): the first non-finite core token, the last non-finite raw
    position at or before each m. Key row i of v is position `position0 + i` (core token j is
    group j); query row t is key row `q_start + t` (Lq = num_queries, default the rest)."""
    B, C, H, _ = core_v.shape
    Lk, Hkv = v.shape[1], v.shape[2]
    Lq = Lk - q_start if num_queries is None else num_queries
    rows = q_start + jnp.arange(Lq)                                               # key rows
    visible = visible_core_count(position0 + rows, group_size, window_size)       # c(m), [Lq]
    first_bad_core = jnp.min(jnp.where(nonfinite_rows(core_v), jnp.arange(C)[:, None], C),
                             axis=1, initial=C)                                   # [B, H]
    n = position0 + jnp.arange(Lk)
    last_bad_raw = jax.lax.cummax(jnp.where(nonfinite_rows(v), n[:, None], -1), axis=1)
    last_bad_raw = last_bad_raw[:, q_start:q_start + Lq]                          # at n = m
    seen_core = first_bad_core[:, None, :] < visible[None, :, None]               # [B, Lq, H]
    seen_raw = last_bad_raw >= (visible * group_size)[None, :, None]            # [B, Lq, Hkv]
    return seen_core | jnp.repeat(seen_raw, H // Hkv, axis=2)


def _chunked_attention(q, k, v, core_k, core_v, *, group_size, window_size, scale, chunk_size,
                       q_start: int = 0, position0=0):
    """Shared engine: softmax over [visible core ; raw window] for each query chunk.

    core_k/core_v: [B, C, H, d] (C may be 0; core token j is group j). Returns
    [B, Lq, H, d] in q.dtype.

    Positions: key row i of k / v is position `position0 + i` (an int or a traced scalar, a
    multiple of nothing in particular); query row t is key row `q_start + t` (a Python int:
    the queries are the last Lq rows of the keys or a block inside them). The whole sequence
    is `position0 = q_start = 0` with k, v as long as q; a context-parallel shard passes
    its halo of earlier keys in front of its own (cca_jax.context).
    """
    B, Lq, H, d = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    r = H // Hkv
    C = core_k.shape[1]
    g, w = group_size, window_size
    if q_start < 0 or q_start + Lq > Lk:
        raise ValueError(f"the queries (rows {q_start}..{q_start + Lq - 1} of the keys) must "
                         f"lie inside the {Lk} key rows")
    seen_nonfinite = _rows_seeing_nonfinite(core_v, v, group_size=g, window_size=w,
                                            q_start=q_start, position0=position0,
                                            num_queries=Lq)
    core_v, v = finite_or_zero(core_v), finite_or_zero(v)
    Q = max(1, min(chunk_size, Lq))
    n_chunks = math.ceil(Lq / Q)
    Lqp = n_chunks * Q
    # Keys padded past the last padded query: every padded query row sees its own (zero)
    # key, so no row of the softmax is empty.
    Lkp = max(Lk, q_start + Lqp)
    q_chunks = jnp.pad(q, [(0, 0), (0, Lqp - Lq), (0, 0), (0, 0)])
    q_chunks = q_chunks.reshape(B, n_chunks, Q, Hkv, r, d).swapaxes(0, 1)
    k_pad = jnp.pad(k, [(0, 0), (0, Lkp - Lk), (0, 0), (0, 0)])
    v_pad = jnp.pad(v, [(0, 0), (0, Lkp - Lk), (0, 0), (0, 0)])
    # Widest raw span a chunk can need (docs/cca.md §2: the window holds < w + g keys per query).
    R = min(Q + w + g - 1, Lkp)
    core_k5 = core_k.reshape(B, C, Hkv, r, d)
    core_v5 = core_v.reshape(B, C, Hkv, r, d)
    ct = compute_dtype(q.dtype)

    def one_chunk(args):
        index, q_chunk = args
        first = q_start + index * Q            # key row of the chunk's first query
        m = position0 + first + jnp.arange(Q)  # positions of the chunk's queries
        # Clamping keeps the slice in bounds; positions below are taken from the clamped
        # start, so the masks stay exact whatever the clamp did.
        start = jnp.clip(visible_core_count(m[0], g, w) * g - position0, 0, Lkp - R)
        k_raw = jax.lax.dynamic_slice_in_dim(k_pad, start, R, axis=1)
        v_raw = jax.lax.dynamic_slice_in_dim(v_pad, start, R, axis=1)
        n = position0 + start + jnp.arange(R)
        visible = visible_core_count(m, g, w)
        raw_mask = (n[None, :] >= visible[:, None] * g) & (n[None, :] <= m[:, None])
        core_mask = jnp.arange(C)[None, :] < visible[:, None]

        raw_scores = _einsum("bqkrd,bnkd->bkrqn", q_chunk, k_raw) * scale
        core_scores = _einsum("bqkrd,bckrd->bkrqc", q_chunk, core_k5) * scale
        scores = jnp.concatenate([jnp.where(core_mask, core_scores, -jnp.inf),
                                  jnp.where(raw_mask, raw_scores, -jnp.inf)], axis=-1)
        # float32 softmax; probabilities in the value dtype for the value product, as in
        # flash attention (no change for float32 inputs), with a float32 backward.
        probs = jax.nn.softmax(scores.astype(ct), axis=-1)
        out = (_value_product("bkrqc,bckrd->bqkrd", probs[..., :C], core_v5)
               + _value_product("bkrqn,bnkd->bqkrd", probs[..., C:], v_raw))
        return out.astype(q.dtype)

    out = jax.lax.map(jax.checkpoint(one_chunk), (jnp.arange(n_chunks), q_chunks))
    out = out.swapaxes(0, 1).reshape(B, Lqp, H, d)[:, :Lq]
    return mask_nonfinite_values(out, seen_nonfinite)


# Jitted with the settings static: called op by op (an eager `model(ids)`), `lax.map` would
# trace its body again on every call and compile it anew for every layer.
@functools.partial(jax.jit, static_argnames=("group_size", "window_size", "scale",
                                             "chunk_size"))
def cca_blocked(q, k, v, *, group_size: int, window_size: int, scale: float,
                chunk_size: int = DEFAULT_CHUNK_SIZE):
    """CCA attention (docs/cca.md) in query chunks; same function as `cca_reference`."""
    L = q.shape[1]
    # Only groups that some query can see are pooled: c(L - 1) of them.
    n_visible = visible_core_count(L - 1, group_size, window_size)
    core_k, core_v = pool_core_tokens(q, k, v, group_size=group_size, scale=scale,
                                      num_groups=n_visible)
    return _chunked_attention(q, k, v, core_k.astype(q.dtype), core_v.astype(q.dtype),
                              group_size=group_size, window_size=window_size, scale=scale,
                              chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("scale", "chunk_size"))
def causal_blocked(q, k, v, *, scale: float, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """Causal attention in query chunks (memory O(chunk * L), never L x L)."""
    B, L, H, d = q.shape
    no_core = jnp.zeros((B, 0, H, d), q.dtype)
    return _chunked_attention(q, k, v, no_core, no_core, group_size=1, window_size=L,
                              scale=scale, chunk_size=chunk_size)
