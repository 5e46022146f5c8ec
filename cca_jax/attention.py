"""The CCA attention op (`cca_attention`) and full causal attention (`causal_attention`).

The NNX layer that projects, rotates and calls these ops is `cca_jax.layer.CCAAttention`.

`cca_attention` checks its arguments before any compute and dispatches to one
implementation of the same function (docs/cca.md):

- "reference": the readable dense definition in `cca_jax.reference` (small L only);
- "xla": blocked jnp in `cca_jax.blocked`, never an `L x L` array, any backend;
- "pallas": fused Pallas kernels (`cca_kernels/`, Triton on a GPU; `interpret=True` runs the
  same kernels on the CPU), pooling in jnp, custom VJP with Pallas backward kernels;
- "auto": "pallas" on a GPU, "xla" elsewhere.
"""
from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from cca_jax.blocked import causal_blocked, cca_blocked
from cca_jax.config import CCA_IMPLEMENTATIONS, check_implementation, check_positive_int
from cca_jax.reference import causal_reference, cca_reference, pool_core_tokens
from cca_kernels.cca_attention import cca_attention_pallas
from cca_kernels.visibility import visible_core_count

CAUSAL_IMPLEMENTATIONS = ("auto", "reference", "xla", "cudnn")


def _check_qkv(q, k, v, scale) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must have shape [batch, length, heads, head_dim], "
                             f"got shape {getattr(x, 'shape', type(x).__name__)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {k.shape} and v {v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    (B, L, H, d), (Bk, Lk, Hkv, dk) = q.shape, k.shape
    if (B, L) != (Bk, Lk):
        raise ValueError(f"q and k must agree in batch and length, got q {q.shape} and k {k.shape}")
    if d != dk:
        raise ValueError(f"q and k must have the same head_dim, got {d} and {dk}")
    if B < 1 or L < 1 or H < 1 or Hkv < 1:
        raise ValueError(f"batch, length and head counts must be >= 1 (q [batch, length, "
                         f"heads, head_dim], k and v [batch, length, kv_heads, head_dim]), "
                         f"got q {q.shape}, k {k.shape}")
    if H % Hkv:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the number "
                         f"of key/value heads ({Hkv})")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not scale > 0 or not math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")


def resolve_implementation(implementation: str, interpret: bool = False,
                           allowed: tuple[str, ...] = CCA_IMPLEMENTATIONS) -> str:
    """The CCA implementation that runs here: "auto" is "pallas" on a GPU and "xla"
    elsewhere; "pallas" needs a GPU or interpret=True, and interpret=True needs "pallas".
    Shared by `cca_attention` and the context-parallel op (cca_jax.context)."""
    check_implementation(implementation, allowed)
    if implementation == "auto":
        implementation = "pallas" if jax.default_backend() == "gpu" else "xla"
    if implementation == "pallas":
        if not interpret and jax.default_backend() != "gpu":
            raise ValueError("implementation='pallas' needs a GPU backend (Triton); on "
                             f"{jax.default_backend()!r} pass interpret=True or use 'xla'")
    elif interpret:
        raise ValueError(f"interpret=True only applies to implementation='pallas', "
                         f"got {implementation!r}")
    return implementation


def cca_attention(q, k, v, *, group_size: int, window_size: int, scale: float | None = None,
                  implementation: str = "auto", interpret: bool = False):
    """Core Context Aware attention (docs/cca.md), differentiable in q, k and v.

    Args:
      q: queries after RoPE, [B, L, H, d].
      k, v: keys (after RoPE) and values, [B, L, Hkv, d], with H % Hkv == 0.
      group_size: g, tokens pooled into one core token (>= 1).
      window_size: w, the minimum raw local window (>= 1; need not divide by g).
      scale: softmax scale, default 1/sqrt(d).
      implementation: "auto", "reference", "xla" or "pallas".
      interpret: run the Pallas kernels in interpret mode (CPU); only with "pallas".
    Returns:
      [B, L, H, d] in q.dtype.
    """
    check_positive_int("group_size", group_size)
    check_positive_int("window_size", window_size)
    _check_qkv(q, k, v, scale)
    implementation = resolve_implementation(implementation, interpret)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if implementation == "pallas":
        return _cca_pallas(q, k, v, group_size=group_size, window_size=window_size,
                           scale=scale, interpret=interpret)
    if implementation == "reference":
        return cca_reference(q, k, v, group_size=group_size,
                                       window_size=window_size, scale=scale)
    return cca_blocked(q, k, v, group_size=group_size, window_size=window_size,
                               scale=scale)


def _cca_pallas(q, k, v, *, group_size, window_size, scale, interpret):
    """Pooling (jnp, differentiable) then the fused Pallas attention kernels."""
    n_visible = visible_core_count(q.shape[1] - 1, group_size, window_size)
    core_k, core_v = pool_core_tokens(q, k, v, group_size=group_size, scale=scale,
                                                num_groups=n_visible)
    return cca_attention_pallas(q, k, v, core_k.astype(q.dtype), core_v.astype(q.dtype),
                                group_size=group_size, window_size=window_size, scale=scale,
                                interpret=interpret)


def cudnn_supported(q) -> bool:
    """Whether cuDNN's fused attention can run q here (a GPU, bf16/fp16, head_dim <= 128, a
    multiple of 8)."""
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0)


def causal_attention(q, k, v, *, scale: float | None = None, implementation: str = "auto"):
    """Full causal softmax attention with GQA, same layout as `cca_attention`.

    "auto" uses cuDNN on a GPU for bf16/fp16 inputs and the blocked jnp path elsewhere
    (memory O(chunk * L), never an L x L array). "cudnn" raises if cuDNN cannot run.
    """
    _check_qkv(q, k, v, scale)
    check_implementation(implementation, CAUSAL_IMPLEMENTATIONS)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if implementation == "auto":
        implementation = "cudnn" if cudnn_supported(q) else "xla"
    if implementation == "cudnn":
        if not cudnn_supported(q):
            raise ValueError("implementation='cudnn' needs a GPU backend, bf16/fp16 inputs and "
                             f"head_dim <= 128 (multiple of 8); got backend "
                             f"{jax.default_backend()!r}, dtype {q.dtype}, head_dim {q.shape[-1]}")
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                            implementation="cudnn")
    if implementation == "reference":
        return causal_reference(q, k, v, scale=scale)
    return causal_blocked(q, k, v, scale=scale)
