"""The exact CCA attention function of docs/cca.md, written to be read, in plain jnp.

This is the oracle every other implementation is tested against. It builds dense
`[L, L]` masks, so it is for short sequences only; the blocked XLA path and the Pallas
kernels compute the same function without them. Computation is in float32 (or the input
dtype if that is wider) with full-precision matrix products; the output has the input dtype.

Non-finite inputs reach only the rows that see them: a masked (query, key) pair is excluded
with `where`, never multiplied by a zero probability (0 * NaN is NaN), so a NaN or Inf in a
key, value or core token that a row cannot see leaves that row exactly as it would be with
any finite number there. A row that sees a non-finite value is NaN here and in the blocked
path (`mask_nonfinite_values`), NaN or Inf in the Pallas kernels (whatever the arithmetic
gives where no mask is needed); never a finite number.
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
    """Globality-aware pooling (docs/cca.md §1): one core key/value per group and query head.

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


def finite_or_zero(x):
    """`x` with every NaN / Inf replaced by 0 (for the value operand of masked products)."""
    return jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))


def nonfinite_rows(x):
    """True where the vector on the last axis of `x` holds a NaN or an Inf."""
    return ~jnp.all(jnp.isfinite(x), axis=-1)


def mask_nonfinite_values(out, seen_nonfinite):
    """`out` [B, L, H, d] with NaN in the rows (`seen_nonfinite` [B, L, H]) that see a
    non-finite value; the value product itself ran on `finite_or_zero` values, so masked
    pairs never turned a row NaN."""
    return jnp.where(seen_nonfinite[..., None], jnp.asarray(jnp.nan, out.dtype), out)


def cca_reference(q, k, v, *, group_size: int, window_size: int, scale: float):
    """CCA attention exactly as docs/cca.md defines it, with dense masks (small L only)."""
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
    out = (jnp.einsum("bhmj,bjhd->bmhd", probs[..., :C], finite_or_zero(core_v),
                      precision=_HIGHEST)
           + jnp.einsum("bhmn,bnhd->bmhd", probs[..., C:], finite_or_zero(v_rep),
                        precision=_HIGHEST))
    # Rows that see a non-finite core token or raw value: [B, H, L] -> [B, L, H].
    seen = (jnp.any(core_mask & nonfinite_rows(core_v).transpose(0, 2, 1)[:, :, None, :], -1)
            | jnp.any(raw_mask & nonfinite_rows(v_rep).transpose(0, 2, 1)[:, :, None, :], -1))
    return mask_nonfinite_values(out, seen.transpose(0, 2, 1)).astype(q.dtype)


def causal_reference(q, k, v, *, scale: float):
    """Plain causal softmax attention with GQA, dense (small L only)."""
    L = q.shape[1]
    # CCA with a window covering the whole sequence is exactly causal attention (docs/cca.md §2).
    return cca_reference(q, k, v, group_size=1, window_size=L, scale=scale)
