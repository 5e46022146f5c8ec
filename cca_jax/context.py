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

Then the shard attends with its own queries against [halo ; own keys] and all core tokens,
in its global positions, so the visibility rule is the one of `cca_kernels.visibility`
everywhere: on a GPU the Pallas kernels (`cca_attention_pallas` with the shard's traced
`query_offset`; they visit only the key and core blocks its rows see), elsewhere the blocked
engine of `cca_jax.blocked` (`implementation=`, resolved as `cca_attention` resolves it). Gradients come from autodiff: the transpose of
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
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from cca_jax.attention import resolve_implementation
from cca_jax.blocked import DEFAULT_CHUNK_SIZE, _chunked_attention
from cca_jax.reference import pool_core_tokens
from cca_kernels.cca_attention import cca_attention_pallas
from cca_kernels.visibility import visible_core_count

__all__ = ["halo_length", "zigzag_order", "shard_work", "cca_attention_shard",
           "cca_attention_context_parallel", "LAYOUTS"]

LAYOUTS = ("contiguous", "zigzag")
IMPLEMENTATIONS = ("auto", "xla", "pallas")


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


def zigzag_order(length: int, n_shards: int):
    """The row order of the "zigzag" layout: the sequence cut into 2n equal pieces, shard i
    holding pieces i and 2n - 1 - i (so every shard has as much early as late work). Returns
    a numpy int array `order` of `length` positions: laid out row t holds position order[t]
    (x_zigzag = x[:, order]; back with x[:, argsort(order)]). length must split into 2n
    pieces."""
    _check_positive_int("n_shards", n_shards)
    if length % (2 * n_shards):
        raise ValueError(f"length ({length}) must split into 2 * n_shards ({2 * n_shards}) "
                         "equal pieces")
    piece = length // (2 * n_shards)
    starts = [p for i in range(n_shards) for p in (i, 2 * n_shards - 1 - i)]
    return np.concatenate([np.arange(p * piece, (p + 1) * piece) for p in starts])


def shard_work(length: int, n_shards: int, group_size: int, window_size: int,
               layout: str = "contiguous"):
    """Visible (query, key) pairs of each shard, a numpy int64 [n_shards] (the attention's
    FLOPs are proportional): a query at m sees c(m) core tokens and m + 1 - c(m) g raw keys.
    `length` must split into the layout's pieces."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    _check_positive_int("length", length)
    _check_positive_int("n_shards", n_shards)
    m = np.arange(length, dtype=np.int64)
    c = np.asarray(visible_core_count(m, group_size, window_size), np.int64)
    pairs = c + (m + 1 - c * group_size)
    if layout == "zigzag":
        pairs = pairs[zigzag_order(length, n_shards)]
    elif length % n_shards:
        raise ValueError(f"length ({length}) must split into n_shards ({n_shards}) shards")
    return pairs.reshape(n_shards, -1).sum(axis=1)


def _zigzag_halo(x, halo: int, axis_name: str, n: int):
    """Halos of the two pieces a shard holds in the zigzag layout (x = [piece a ; piece b],
    pieces i and 2n - 1 - i of shard i), each from the pieces before it wherever they live."""
    B, two_p = x.shape[:2]
    P = two_p // 2
    first, second = x[:, :P], x[:, P:]
    # Piece a = i needs pieces i - 1, i - 2, ...: the first halves of the shards before it,
    # exactly the contiguous layout's halo of the first halves.
    halo_a = _halo(first, halo, axis_name, n)
    halo_b = []
    for s in range(-(-halo // P), 0, -1):            # the farthest piece first
        rows = min(P, halo - (s - 1) * P)
        # Piece b = 2n-1-i needs piece q = 2n-1-i-s: the second half of shard i + s when
        # q >= n, else the first half of shard q. One ppermute each (a shard may be the
        # source of both kinds for different destinations).
        from_second = lax.ppermute(second[:, P - rows:], axis_name,
                                   [(i + s, i) for i in range(n) if i + s <= n - 1])
        from_first = lax.ppermute(first[:, P - rows:], axis_name,
                                  [(2 * n - 1 - i - s, i) for i in range(n)
                                   if 0 <= 2 * n - 1 - i - s <= n - 1])
        halo_b.append(from_second + from_first)       # at most one of them is not zeros
    return halo_a, jnp.concatenate(halo_b, axis=1) if len(halo_b) > 1 else halo_b[0]


def _attend(implementation: str, *, group_size: int, window_size: int, scale: float,
            chunk_size: int, halo: int, interpret: bool):
    """attend(q, k, v, core_k, core_v, start): queries at global positions start .. (a traced
    int32), keys = [halo rows ; the queries' own], all core tokens of the sequence."""
    if implementation == "pallas":
        def attend(q, k, v, core_k, core_v, start):
            return cca_attention_pallas(q, k, v, core_k, core_v, group_size=group_size,
                                        window_size=window_size, scale=scale,
                                        interpret=interpret, query_offset=start)
        return attend
    blocked = functools.partial(_chunked_attention, group_size=group_size,
                                window_size=window_size, scale=scale, chunk_size=chunk_size,
                                q_start=halo)
    return lambda q, k, v, core_k, core_v, start: blocked(q, k, v, core_k, core_v,
                                                          position0=start - halo)


def cca_attention_shard(q, k, v, *, axis_name: str, group_size: int, window_size: int,
                        scale: float | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                        layout: str = "contiguous", implementation: str = "auto",
                        interpret: bool = False):
    """CCA attention of one sequence shard; call inside `jax.shard_map` with the sequence
    axis split over `axis_name` into equal shards.

    layout "contiguous": shard i holds rows i * Ls .. (i + 1) * Ls - 1, in order;
    "zigzag": the sequence was reordered by `zigzag_order` before it was split, so shard i
    holds pieces i and 2n - 1 - i of length Ls / 2 (work balanced: CCA's work per query
    grows with its position).

    q [B, Ls, H, d], k, v [B, Ls, Hkv, d]: this shard's rows; each piece's length must be
    a multiple of group_size. Returns [B, Ls, H, d] in q.dtype: the rows of `cca_attention`
    of the whole sequence that this shard holds, in the same layout.

    implementation: "auto" ("pallas" on a GPU, "xla" elsewhere), "xla" (the blocked engine,
    `chunk_size` queries at a time) or "pallas" (the kernels; interpret=True runs them on the
    CPU, inside a `jax.shard_map(..., check_vma=False)`: the interpreter trips the check).
    """
    _check_positive_int("group_size", group_size)
    _check_positive_int("window_size", window_size)
    _check_positive_int("chunk_size", chunk_size)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    implementation = resolve_implementation(implementation, interpret, IMPLEMENTATIONS)
    B, Ls, H, d = q.shape
    g, w = group_size, window_size
    pieces = 2 if layout == "zigzag" else 1
    P = Ls // pieces
    if Ls % pieces or P % g:
        raise ValueError(f"each shard's pieces ({Ls} rows in {pieces}) must be whole groups of "
                         f"group_size ({g}): a group may not straddle two shards")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    n = lax.axis_size(axis_name)
    index = lax.axis_index(axis_name)
    core_k, core_v = pool_core_tokens(q, k, v, group_size=g, scale=scale, num_groups=Ls // g)
    core_k = lax.all_gather(core_k.astype(q.dtype), axis_name, axis=1, tiled=True)
    core_v = lax.all_gather(core_v.astype(q.dtype), axis_name, axis=1, tiled=True)
    halo = halo_length(g, w)
    attend = _attend(implementation, group_size=g, window_size=w, scale=scale,
                     chunk_size=chunk_size, halo=halo, interpret=interpret)
    if layout == "contiguous":
        # All groups in order: group j of shard s is global group s * Ls/g + j.
        if halo:
            k = jnp.concatenate([_halo(k, halo, axis_name, n), k], axis=1)
            v = jnp.concatenate([_halo(v, halo, axis_name, n), v], axis=1)
        return attend(q, k, v, core_k, core_v, index * Ls)
    # Zigzag: the gathered groups come shard by shard (piece i's, then piece 2n-1-i's); put
    # them in the order of the sequence.
    per = P // g
    blocks = [2 * p if p < n else 2 * (2 * n - 1 - p) + 1 for p in range(2 * n)]
    reorder = lambda c: c.reshape(B, 2 * n, per, *c.shape[2:])[:, np.asarray(blocks)].reshape(
        c.shape)
    core_k, core_v = reorder(core_k), reorder(core_v)
    starts = (index * P, (2 * n - 1 - index) * P)
    outs = []
    if halo:
        halos_k = _zigzag_halo(k, halo, axis_name, n)
        halos_v = _zigzag_halo(v, halo, axis_name, n)
    for part, start in enumerate(starts):
        rows = slice(part * P, (part + 1) * P)
        k_part, v_part = k[:, rows], v[:, rows]
        if halo:
            k_part = jnp.concatenate([halos_k[part], k_part], axis=1)
            v_part = jnp.concatenate([halos_v[part], v_part], axis=1)
        outs.append(attend(q[:, rows], k_part, v_part, core_k, core_v, start))
    return jnp.concatenate(outs, axis=1)


def cca_attention_context_parallel(q, k, v, *, mesh, group_size: int, window_size: int,
                                   axis_name: str = "context", batch_axes=None,
                                   head_axes=None, scale: float | None = None,
                                   chunk_size: int = DEFAULT_CHUNK_SIZE,
                                   layout: str = "contiguous", implementation: str = "auto",
                                   interpret: bool = False):
    """`cca_attention` of q [B, L, H, d], k, v [B, L, Hkv, d] with the sequence split over the
    mesh axis `axis_name` (and, optionally, batch over `batch_axes`, heads over `head_axes`,
    which must then divide both H and Hkv).

    Any L works: the sequence is padded at its end to whole groups per shard (later rows
    never change earlier ones) and the result sliced back. `layout="zigzag"` reorders the
    rows by `zigzag_order` before splitting and back after (balanced work; a trainer that
    keeps its tokens in that order calls `cca_attention_shard` directly). Same function as
    `cca_attention(q, k, v, group_size=..., window_size=...)`; per shard the Pallas kernels
    on a GPU, the XLA (blocked) engine elsewhere (`implementation`, `interpret` as in
    `cca_attention_shard`).
    """
    _check_positive_int("group_size", group_size)
    _check_positive_int("window_size", window_size)
    resolve_implementation(implementation, interpret, IMPLEMENTATIONS)
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
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    n = mesh.shape[axis_name]
    parts = n * (2 if layout == "zigzag" else 1)
    Lp = -(-L // (parts * group_size)) * group_size * parts
    if Lp != L:
        pad = [(0, 0), (0, Lp - L), (0, 0), (0, 0)]
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
    if layout == "zigzag":
        order = zigzag_order(Lp, n)
        q, k, v = (jnp.take(x, order, axis=1) for x in (q, k, v))
    spec = P(batch_axes, axis_name, head_axes, None)
    axis_type = getattr(jax.sharding, "AxisType", None)
    explicit = axis_type is not None and axis_type.Explicit in tuple(
        getattr(mesh, "axis_types", ()))
    if explicit:
        # Explicit axes: shard_map takes arrays already laid out as its in_specs say.
        sharding = jax.sharding.NamedSharding(mesh, spec)
        q, k, v = (jax.sharding.reshard(x, sharding) for x in (q, k, v))
    body = functools.partial(cca_attention_shard, axis_name=axis_name, group_size=group_size,
                             window_size=window_size, scale=scale, chunk_size=chunk_size,
                             layout=layout, implementation=implementation, interpret=interpret)
    # The Pallas interpreter evaluates the kernels on values typed as varying over the mesh
    # axes, which shard_map's check of varying axes rejects (jax 0.10): off for interpret mode
    # (the collectives' transposes are the same either way; the tests compare gradients).
    out = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                        check_vma=not interpret)(q, k, v)
    if layout == "zigzag":
        out = jnp.take(out, np.argsort(order), axis=1)
    if Lp == L:
        return out
    if explicit:   # the padded tail cannot be cut from a sequence split over explicit axes
        out = jax.sharding.reshard(out, jax.sharding.NamedSharding(
            mesh, P(batch_axes, None, head_axes, None)))
    return out[:, :L]
