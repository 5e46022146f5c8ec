"""The exact CCA attention function of SPEC.md, written to be read, in plain jnp.

This is the oracle every other implementation is tested against. It builds dense
`[L, L]` masks, so it is for short sequences only; the blocked XLA path and the Pallas
kernels compute the same function without them. Computation is in float32 (or the input
dtype if that is wider) with full-precision matrix products; the output has the input dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cca_kernels.visibility import visible_core_count

_HIGHEST = jax.lax.Precision.HIGHEST


def compute_dtype(dtype) -> jnp.dtype:
    """float32 for half-precision inputs, the input dtype otherwise (e.g. float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def pool_core_tokens(q, k, v, *, group_size: int, scale: float, num_groups: int | None = None):
    """Globality-aware pooling (SPEC section 1): one core key/value per group and query head.

    q: [B, L, H, d]; k, v: [B, L, Hkv, d]. Returns (core_k, core_v), each [B, C, H, d] where
    C = num_groups (default: every complete group, L // g). Group j's weights are the
    softmax over the group of s * <q[last token of j], k[token]>. Computed in `compute_dtype`.
    """
    B, L, H, d = q.shape
    Hkv = k.shape[2]
    r = H // Hkv
    g = group_size
    C = L // g if num_groups is None else num_groups
    ct = compute_dtype(q.dtype)
    k_groups = k[:, : C * g].astype(ct).reshape(B, C, g, Hkv, d)
    v_groups = v[:, : C * g].astype(ct).reshape(B, C, g, Hkv, d)
    q_last = q[:, g - 1 : C * g : g].astype(ct).reshape(B, C, Hkv, r, d)
    logits = jnp.einsum("bckrd,bcikd->bckri", q_last, k_groups, precision=_HIGHEST) * scale
    weights = jax.nn.softmax(logits, axis=-1)
    core_k = jnp.einsum("bckri,bcikd->bckrd", weights, k_groups, precision=_HIGHEST)
    core_v = jnp.einsum("bckri,bcikd->bckrd", weights, v_groups, precision=_HIGHEST)
    return core_k.reshape(B, C, H, d), core_v.reshape(B, C, H, d)


def cca_reference(q, k, v, *, group_size: int, window_size: int, scale: float):
    """CCA attention exactly as SPEC.md defines it, with dense masks (small L only)."""
    B, L, H, d = q.shape
    r = H // k.shape[2]
    ct = compute_dtype(q.dtype)
    core_k, core_v = pool_core_tokens(q, k, v, group_size=group_size, scale=scale)
    C = core_k.shape[1]
    qf = q.astype(ct)
    k_rep = jnp.repeat(k.astype(ct), r, axis=2)  # query head h uses kv head h // r
    v_rep = jnp.repeat(v.astype(ct), r, axis=2)

    m = jnp.arange(L)
    n = jnp.arange(L)
    visible = visible_core_count(m, group_size, window_size)             # c(m), [L]
    core_mask = jnp.arange(C)[None, :] < visible[:, None]                # [L, C]
    raw_mask = (n[None, :] >= visible[:, None] * group_size) & (n[None, :] <= m[:, None])

    core_scores = jnp.einsum("bmhd,bjhd->bhmj", qf, core_k, precision=_HIGHEST) * scale
    raw_scores = jnp.einsum("bmhd,bnhd->bhmn", qf, k_rep, precision=_HIGHEST) * scale
    scores = jnp.concatenate(
        [jnp.where(core_mask, core_scores, -jnp.inf), jnp.where(raw_mask, raw_scores, -jnp.inf)],
        axis=-1)
    probs = jax.nn.softmax(scores, axis=-1)  # one softmax over [core ; raw]
    out = (jnp.einsum("bhmj,bjhd->bmhd", probs[..., :C], core_v, precision=_HIGHEST)
           + jnp.einsum("bhmn,bnhd->bmhd", probs[..., C:], v_rep, precision=_HIGHEST))
    return out.astype(q.dtype)


def causal_reference(q, k, v, *, scale: float):
    """Plain causal softmax attention with GQA, dense (small L only)."""
    L = q.shape[1]
    # CCA with a window covering the whole sequence is exactly causal attention (SPEC 2).
    return cca_reference(q, k, v, group_size=1, window_size=L, scale=scale)
