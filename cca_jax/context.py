"""Context (sequence) parallelism for CCA attention: shards exchange core tokens and a halo.

The sequence is split into contiguous shards over one mesh axis; every shard starts at a
multiple of g. A query at position m sees the core tokens j < c(m) and the raw keys
c(m) * g .. m, and c(m) * g >= m - (w + g - 2). So a shard needs, besides its own rows:

- the core tokens of every group before it: each shard pools its own groups (a group never
  straddles two shards) and one all-gather of the core keys and values gives every shard all
  of them: 2 * (L / g) * H * d values per layer, against 2 * L * Hkv * d for gathering the keys
  and values as full attention's context parallelism does (g * Hkv / H as much: 1/16 for
  H = Hkv = 32, g = 16);
- a halo: the last `halo_length(g, w)` (= w + g - 2 rounded up to whole groups) raw keys and
  values before its first row, from the shard before it, or from several shards when a shard
  is shorter than the halo (one `ppermute` per shard it spans).

Then the shard runs the blocked engine of `cca_jax.blocked` on its own queries against
[halo ; own keys] and all core tokens, with its global positions, so the visibility rule is
the one of `cca_kernels.visibility` everywhere. Gradients come from autodiff: the transpose of
the all-gather sums each core token's cotangents back onto the shard that pooled it, the
transpose of each ppermute sends the halo's cotangents back to its owner.

`cca_attention_shard` is the per-shard body (inside `jax.shard_map`);
`cca_attention_context_parallel` wraps it for arrays laid out over a mesh, pads a length that
does not split into whole groups per shard, and composes with batch and head axes.
"""
from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from cca_jax.blocked import DEFAULT_CHUNK_SIZE, _chunked_attention
from cca_jax.reference import pool_core_tokens

__all__ = ["halo_length", "cca_attention_shard", "cca_attention_context_parallel"]


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def halo_length(group_size: int, window_size: int) -> int:
    """Raw keys before a shard's first position that its queries can see (w + g - 2, at
    least 0), rounded up to whole groups."""
    _check_positive_int("group_size", group_size)
    _check_positive_int("window_size", window_size)
    need = max(0, window_size + group_size - 2)
    return -(-need // group_size) * group_size


def _halo(x, halo: int, axis_name: str, n_shards: int):
    """The `halo` rows before this shard's first row, gathered from the shards before it
    (rows before position 0 are zeros: no query can see them)."""
    B, Ls = x.shape[:2]
    pieces = []
    hops = -(-halo // Ls)
    for s in range(hops, 0, -1):               # the farthest shard first
        rows = min(Ls, halo - (s - 1) * Ls)    # what this hop contributes
        pairs = [(j, j + s) for j in range(n_shards - s)]
        pieces.append(lax.ppermute(x[:, Ls - rows:], axis_name, pairs))
    return jnp.concatenate(pieces, axis=1) if len(pieces) > 1 else pieces[0]


def cca_attention_shard(q, k, v, *, axis_name: str, group_size: int, window_size: int,
                        scale: float | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """CCA attention of one sequence shard; call inside `jax.shard_map` with the sequence
    axis split over `axis_name` into equal contiguous shards, in order.

    q [B, Ls, H, d], k, v [B, Ls, Hkv, d]: this shard's rows; Ls must be a multiple of
    group_size. Returns [B, Ls, H, d] in q.dtype: the rows of `cca_attention` of the whole
    sequence that this shard holds.
    """
    _check_positive_int("group_size", group_size)
    _check_positive_int("window_size", window_size)
    _check_positive_int("chunk_size", chunk_size)
    B, Ls, H, d = q.shape
    g, w = group_size, window_size
    if Ls % g:
        raise ValueError(f"each shard's length ({Ls}) must be a multiple of group_size ({g}): "
                         "a group may not straddle two shards")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    n_shards = lax.axis_size(axis_name)
    first = lax.axis_index(axis_name) * Ls     # global position of this shard's row 0
    core_k, core_v = pool_core_tokens(q, k, v, group_size=g, scale=scale, num_groups=Ls // g)
    # All groups of the sequence, in order (group j of shard s is global group s * Ls/g + j).
    core_k = lax.all_gather(core_k.astype(q.dtype), axis_name, axis=1, tiled=True)
    core_v = lax.all_gather(core_v.astype(q.dtype), axis_name, axis=1, tiled=True)
    halo = halo_length(g, w)
    if halo:
        k = jnp.concatenate([_halo(k, halo, axis_name, n_shards), k], axis=1)
        v = jnp.concatenate([_halo(v, halo, axis_name, n_shards), v], axis=1)
    return _chunked_attention(q, k, v, core_k, core_v, group_size=g, window_size=w,
                              scale=scale, chunk_size=chunk_size, q_start=halo,
                              position0=first - halo)


def cca_attention_context_parallel(q, k, v, *, mesh, group_size: int, window_size: int,
                                   axis_name: str = "context", batch_axes=None,
                                   head_axes=None, scale: float | None = None,
                                   chunk_size: int = DEFAULT_CHUNK_SIZE):
    """`cca_attention` of q [B, L, H, d], k, v [B, L, Hkv, d] with the sequence split over the
    mesh axis `axis_name` (and, optionally, batch over `batch_axes`, heads over `head_axes`,
    which must then divide both H and Hkv).

    Any L works: the sequence is padded at its end to whole groups per shard (later rows
    never change earlier ones) and the result sliced back. Same function as
    `cca_attention(q, k, v, group_size=..., window_size=...)`; the XLA (blocked) engine runs
    per shard.
    """
    _check_positive_int("group_size", group_size)
    _check_positive_int("window_size", window_size)
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh "
                         f"{tuple(mesh.axis_names)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be 4-D [B, L, heads, d], got shape "
                             f"{getattr(x, 'shape', None)}")
    B, L, H, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, L) or k.shape[3] != d or H % k.shape[2]:
        raise ValueError(f"k and v must be [B, L, Hkv, d] with Hkv dividing H; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    n = mesh.shape[axis_name]
    shard = -(-L // (n * group_size)) * group_size
    Lp = shard * n
    if Lp != L:
        pad = [(0, 0), (0, Lp - L), (0, 0), (0, 0)]
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
    spec = P(batch_axes, axis_name, head_axes, None)
    axis_type = getattr(jax.sharding, "AxisType", None)
    explicit = axis_type is not None and axis_type.Explicit in tuple(
        getattr(mesh, "axis_types", ()))
    if explicit:
        # Explicit axes: shard_map takes arrays already laid out as its in_specs say.
        layout = jax.sharding.NamedSharding(mesh, spec)
        q, k, v = (jax.sharding.reshard(x, layout) for x in (q, k, v))
    body = functools.partial(cca_attention_shard, axis_name=axis_name, group_size=group_size,
                             window_size=window_size, scale=scale, chunk_size=chunk_size)
    out = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)(q, k, v)
    if Lp == L:
        return out
    if explicit:   # the padded tail cannot be cut from a sequence split over explicit axes
        out = jax.sharding.reshard(out, jax.sharding.NamedSharding(
            mesh, P(batch_axes, None, head_axes, None)))
    return out[:, :L]
