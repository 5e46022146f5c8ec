"""Shared pieces of the CCA Pallas kernels: block sizes, static configuration, masks, dots.

Imports jax only. The visibility rule itself lives in `cca_kernels.visibility`; every mask here is
built from `visible_core_count`, never re-derived:

- core token j is visible to query m iff j < c(m);
- raw key n is visible to query m iff c(m) * g <= n <= m.

Positions are global. The whole sequence (the default) has query row t and key row t both at
position t. A shard of a longer sequence (`Static.q_offset` / `kv_halo`, cca_jax.context)
has query row t at position q0 + t and key row i at position k0 + i with k0 = q0 - kv_halo:
the keys are [halo ; the queries' own keys]. Halo rows at negative positions (before the
sequence) are never visible, since c(m) * g >= 0; the block loops below skip them. The loop
helpers take the origin of the other axis (`key_start` / `query_start`): None for the whole
sequence (the original formulas, unchanged), else an int or a traced int32 scalar.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from cca_kernels.visibility import visible_core_count

LOG2E = math.log2(math.e)
# Finite "minus infinity" for masked scores: exp2(MASK - x) == 0 for any finite x, and an
# all-masked block never produces inf - inf = NaN in the online softmax.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and Triton launch parameters of the CCA kernels (all tiles powers of 2).

    block_q / block_k:         forward kernel; query block (grid) and key/core block (loops).
    block_q_dq / block_k_dq:   dq kernel; query block (grid) and key/core block (loops).
    block_q_dkv / block_k_dkv: dk/dv kernel (key block = grid, query block = loop) and the
                               dcore kernel (core block = grid, query block = loop).
    num_warps / num_stages:    Triton launch parameters of the forward kernel.
    num_warps_bwd / num_stages_bwd: the same for the three backward kernels.
    """
    block_q: int = 64
    block_k: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2

    TILE_FIELDS = ("block_q", "block_k", "block_q_dq", "block_k_dq", "block_q_dkv", "block_k_dkv")

    def check(self, interpret: bool) -> None:
        for name in self.TILE_FIELDS:
            size = getattr(self, name)
            if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size & (size - 1):
                raise ValueError(f"block_sizes.{name} must be a power of 2, got {size!r}")
            if not interpret and size < 16:
                raise ValueError(f"block_sizes.{name} must be >= 16 on the GPU (Triton dot "
                                 f"tiles), got {size}")
        for name in ("num_warps", "num_stages", "num_warps_bwd", "num_stages_bwd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"block_sizes.{name} must be an int >= 1, got {value!r}")

    @property
    def seq_multiple(self) -> int:
        """The padded sequence length is a multiple of every query/key tile."""
        return max(self.block_q, self.block_k, self.block_q_dq, self.block_k_dq,
                   self.block_q_dkv, self.block_k_dkv)

    @property
    def core_multiple(self) -> int:
        """The padded number of core tokens is a multiple of every core tile."""
        return max(self.block_k, self.block_k_dq, self.block_k_dkv)


def _device_kind() -> str:
    try:
        return jax.devices()[0].device_kind.lower()
    except Exception:  # pragma: no cover - no backend at all
        return ""


# Up to this sequence length a Hopper forward on bf16/fp16 with head_dim > 64 takes 64 x 64
# tiles with 4 warps: measured on an H200 (2026-12-04, cca_kernels/NOTES.md), 6-7% faster
# than 128 x 128 at 2K-8K and 7% slower at 32K, 9% slower at 128K.
SHORT_FORWARD_LENGTH = 8192


def default_block_sizes(head_dim: int, dtype, *, interpret: bool,
                        length: int | None = None) -> BlockSizes:
    """Tile table keyed by GPU generation, head dim, input width and (for the forward tiles)
    the sequence length (None: the long-sequence tiles)."""
    if interpret:
        # The CPU interpreter pays per grid step and per loop iteration, not per element.
        return BlockSizes(32, 32, 32, 32, 32, 32)
    kind = _device_kind()
    wide = jnp.dtype(dtype).itemsize >= 4  # float32 tiles take twice the shared memory
    big_head = head_dim > 64
    if any(name in kind for name in ("h100", "h200", "h800", "h20", "gh200", "b200", "gb200")):
        if head_dim > 128:
            return BlockSizes(64, 32, 32, 32, 32, 32, num_warps=8, num_stages=2,
                              num_warps_bwd=8, num_stages_bwd=1)
        if wide:
            return BlockSizes(64, 32, 64, 32, 32, 64, num_warps=4 if not big_head else 8,
                              num_stages=2, num_warps_bwd=4 if not big_head else 8,
                              num_stages_bwd=2)
        # Measured on an H100 (cca_kernels/NOTES.md): 8 backward warps on 64x64 tiles ran the
        # backward 2x slower than 4; a 128x128 forward tile beat 128x64 by 9% at 128K.
        if big_head:
            if length is not None and length <= SHORT_FORWARD_LENGTH:
                return BlockSizes(64, 64, 64, 64, 64, 64, num_warps=4, num_stages=3,
                                  num_warps_bwd=4, num_stages_bwd=2)
            return BlockSizes(128, 128, 64, 64, 64, 64, num_warps=8, num_stages=3,
                              num_warps_bwd=4, num_stages_bwd=2)
        return BlockSizes(128, 64, 64, 64, 64, 64, num_warps=4, num_stages=3,
                          num_warps_bwd=4, num_stages_bwd=2)
    if any(name in kind for name in ("a100", "a800", "a10", "a30", "a40", "l4", "l40")):
        if head_dim > 128 or wide:
            return BlockSizes(64, 32, 32, 32, 32, 32, num_warps=4, num_stages=2,
                              num_warps_bwd=4, num_stages_bwd=1)
        return BlockSizes(128, 64, 64, 64, 64, 64, num_warps=8 if big_head else 4,
                          num_stages=2, num_warps_bwd=8 if big_head else 4, num_stages_bwd=2)
    if head_dim > 128 or wide:
        return BlockSizes(32, 32, 32, 32, 32, 32, num_warps=4, num_stages=1,
                          num_warps_bwd=4, num_stages_bwd=1)
    return BlockSizes(64, 64, 32, 32, 32, 32, num_warps=4, num_stages=2,
                      num_warps_bwd=4, num_stages_bwd=1)


def resolve_block_sizes(block_sizes, head_dim: int, dtype, length: int, *,
                        interpret: bool) -> BlockSizes:
    """Defaults from the table, overridden by a BlockSizes or a dict of its fields, and tiles
    shrunk to the (power-of-2 rounded) sequence length so that short inputs are not padded to
    a large tile."""
    if block_sizes is None:
        sizes = default_block_sizes(head_dim, dtype, interpret=interpret, length=length)
    elif isinstance(block_sizes, BlockSizes):
        sizes = block_sizes
    elif isinstance(block_sizes, dict):
        fields = {f.name for f in dataclasses.fields(BlockSizes)}
        unknown = set(block_sizes) - fields
        if unknown:
            raise ValueError(f"block_sizes has unknown fields {sorted(unknown)}; "
                             f"known: {sorted(fields)}")
        sizes = dataclasses.replace(default_block_sizes(head_dim, dtype, interpret=interpret,
                                                        length=length), **block_sizes)
    else:
        raise TypeError(f"block_sizes must be None, a BlockSizes or a dict, got "
                        f"{type(block_sizes).__name__}")
    sizes.check(interpret)
    cap = max(1 if interpret else 16, 1 << max(0, (length - 1).bit_length()))
    return dataclasses.replace(
        sizes, **{name: min(getattr(sizes, name), cap) for name in BlockSizes.TILE_FIELDS})


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything the kernels need that is known at trace time (hashable)."""
    group_size: int
    window_size: int
    scale: float
    ratio: int            # r = H / Hkv
    has_core: bool        # C > 0
    blocks: BlockSizes
    interpret: bool
    exact_f32: bool       # float32 dots at full precision (IEEE on Triton), else TF32
    # Global position of query row 0: an int baked into the kernels, or None: traced, read
    # from an int32[16] input (every entry equal) that the kernels then take.
    q_offset: int | None = 0
    # Key rows before query row 0's own key (the halo, padded to a multiple of every tile):
    # key row i is position q_offset - kv_halo + i.
    kv_halo: int = 0

    @property
    def whole_sequence(self) -> bool:
        """Queries and keys both start at position 0: the kernels' original code."""
        return self.q_offset == 0 and self.kv_halo == 0

    @property
    def traced_offset(self) -> bool:
        return self.q_offset is None

    @property
    def qk_scale(self) -> float:
        """Scores are kept in the base-2 domain: exp(s * x) == exp2(s * log2(e) * x)."""
        return self.scale * LOG2E


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False, exact: bool = False):
    """2-D matrix product accumulated in float32; operands keep their dtype."""
    contract_a = 0 if trans_a else 1
    contract_b = 1 if trans_b else 0
    precision = lax.Precision.HIGHEST if (exact and a.dtype == jnp.float32) else None
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)


def origins(st: Static, offset_ref):
    """(position of query row 0, position of key row 0) inside a kernel; (None, None) for the
    whole sequence, so that the kernels keep their original code there."""
    if st.whole_sequence:
        return None, None
    q0 = jnp.max(offset_ref[...]) if st.traced_offset else st.q_offset
    return q0, q0 - st.kv_halo


def out_struct(shape, dtype, *inputs):
    """The ShapeDtypeStruct of a kernel output. Inside `jax.shard_map` (which checks how values
    vary over its manual mesh axes) an output varies over every axis some input varies over:
    a shard's output, lse and gradients are its own."""
    types = [jax.typeof(x) for x in inputs]
    if all(hasattr(t, "mat") for t in types):            # jax 0.10: manual axis types
        mat = types[0].mat
        varying = frozenset().union(*(t.mat.varying for t in types))
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=type(mat)(varying=varying))
    if all(hasattr(t, "vma") for t in types):            # earlier: varying manual axes
        return jax.ShapeDtypeStruct(shape, dtype,
                                    vma=frozenset().union(*(t.vma for t in types)))
    return jax.ShapeDtypeStruct(shape, dtype)


def offset_input():
    """BlockSpec of the traced query offset, int32[16] (a Triton-friendly tile), any grid."""
    return pl.BlockSpec((16,), lambda *_: (0,))


def shift(x, origin):
    """Row index -> position: x + origin (x itself when origin is None)."""
    return x if origin is None else x + origin


def iota(start, size: int):
    """Positions start .. start + size - 1 (int32 vector)."""
    return start + lax.broadcasted_iota(jnp.int32, (size,), 0)


def row_visibility(rows, g: int, w: int):
    """Per query: (c(m), first raw key c(m) * g), int32 vectors; computed once per row block."""
    counts = visible_core_count(rows, g, w)
    return counts, counts * g


def core_mask(counts, cols):
    """[rows, cols] mask: core token `cols` visible to the queries with c(m) = `counts`."""
    return cols[None, :] < counts[:, None]


def raw_mask(rows, first, cols):
    """[rows, cols] mask: raw key `cols` visible to query `rows`: c(m) * g <= n <= m."""
    return (cols[None, :] >= first[:, None]) & (cols[None, :] <= rows[:, None])


def _cdiv(a, b: int):
    return lax.div(a + (b - 1), b)


def _clamp(x, lo, hi):
    return jnp.minimum(jnp.maximum(x, lo), hi)


# Every helper below returns the block loop as segments ((start, stop, masked), ...) with
# traced bounds: together they cover exactly the blocks that hold at least one visible
# (query, key) pair, in order, and in every segment with masked=False each pair is visible,
# so those blocks skip the mask. tests/kernels checks both claims by brute force.

def _nonneg(x):
    return jnp.maximum(x, 0)


def raw_key_blocks(m0, block_q: int, block_k: int, g: int, w: int, key_start=None):
    """Raw key blocks for the queries at positions m0 .. m1 = m0 + block_q - 1.

    The union of their raw windows is the contiguous range [c(m0) * g, m1] (c is
    non-decreasing and every query sees itself). A block is fully visible iff its first key is
    >= c(m1) * g and its last key is <= m0. Key block kb holds the positions
    key_start + kb * block_k ...; key_start None: 0, the whole sequence. The keys must hold
    every key the queries see (key_start <= c(m0) * g, and m1 among them).
    """
    m1 = m0 + block_q - 1
    if key_start is not None:
        # Numerators clamped at 0, so lax.div (truncating) is the floor; a clamped one only
        # meets the clamp of its result, which it would get anyway.
        lo = lax.div(_nonneg(visible_core_count(m0, g, w) * g - key_start), block_k)
        hi = lax.div(m1 - key_start, block_k) + 1
        a = _clamp(_cdiv(_nonneg(visible_core_count(m1, g, w) * g - key_start), block_k),
                   lo, hi)
        b = _clamp(lax.div(m0 + 1 - key_start, block_k), a, hi)
        return (lo, a, True), (a, b, False), (b, hi, True)
    lo = lax.div(visible_core_count(m0, g, w) * g, block_k)
    hi = lax.div(m1, block_k) + 1
    a = _clamp(_cdiv(visible_core_count(m1, g, w) * g, block_k), lo, hi)
    b = _clamp(lax.div(m0 + 1, block_k), a, hi)
    return (lo, a, True), (a, b, False), (b, hi, True)


def core_blocks(m0, block_q: int, block_c: int, g: int, w: int, n_core_blocks: int):
    """Core blocks for the queries m0 .. m1: j < c(m1) (seen by some query); the blocks inside
    j < c(m0) are seen by every query. At most the n_core_blocks that exist."""
    hi = jnp.minimum(_cdiv(visible_core_count(m0 + block_q - 1, g, w), block_c), n_core_blocks)
    b = jnp.minimum(lax.div(visible_core_count(m0, g, w), block_c), hi)
    return (0, b, False), (b, hi, True)


def _last_query_of_key(n, g: int, w: int):
    """The largest m that sees raw key n: c(m) <= n // g  <=>  m <= (n // g + 1) * g + w - 2."""
    return (lax.div(n, g) + 1) * g + (w - 2)


def query_blocks_for_keys(n0, block_k: int, block_q: int, g: int, w: int, n_q_blocks: int,
                          query_start=None):
    """Query blocks that see the raw keys n0 .. n1 = n0 + block_k - 1: queries n0 .. last(n1)
    (each of them sees key min(m, n1)). Fully visible: first query >= n1 and last query
    <= last(n0). Query block qb holds the positions query_start + qb * block_q ...;
    query_start None: 0, the whole sequence (then n0 >= 0). A key at a negative position
    (a halo row before the sequence) is seen by no query."""
    n1 = n0 + block_k - 1
    if query_start is not None:
        # floor((x - query_start) / block_q) + 1 == div(x - query_start + block_q, block_q)
        # for x - query_start >= -block_q; below that the block range is empty anyway.
        last1 = _last_query_of_key(_nonneg(n1), g, w)
        hi = jnp.minimum(lax.div(_nonneg(last1 - query_start + block_q), block_q), n_q_blocks)
        hi = jnp.where(n1 >= 0, hi, 0)
        lo = jnp.minimum(lax.div(_nonneg(n0 - query_start), block_q), hi)
        a = _clamp(_cdiv(_nonneg(n1 - query_start), block_q), lo, hi)
        last0 = _last_query_of_key(_nonneg(n0), g, w)
        b = jnp.where(n0 >= 0, _clamp(lax.div(_nonneg(last0 + 1 - query_start), block_q), a, hi),
                      a)
        return (lo, a, True), (a, b, False), (b, hi, True)
    lo = lax.div(n0, block_q)
    hi = jnp.minimum(lax.div(_last_query_of_key(n1, g, w), block_q) + 1, n_q_blocks)
    a = _clamp(_cdiv(n1, block_q), lo, hi)
    b = _clamp(lax.div(_last_query_of_key(n0, g, w) + 1, block_q), a, hi)
    return (lo, a, True), (a, b, False), (b, hi, True)


def query_blocks_for_cores(j0, block_c: int, block_q: int, g: int, w: int, n_q_blocks: int,
                           query_start=None):
    """Query blocks that see core tokens j0 .. j1 = j0 + block_c - 1: from the first query with
    c(m) > j0, i.e. m >= (j0 + 1) * g + w - 1, to the end; fully visible from the first query
    with c(m) > j1. Query block qb holds the positions query_start + qb * block_q ...
    (None: 0)."""
    if query_start is not None:
        lo = jnp.minimum(lax.div(_nonneg((j0 + 1) * g + (w - 1) - query_start), block_q),
                         n_q_blocks)
        a = _clamp(_cdiv(_nonneg((j0 + block_c) * g + (w - 1) - query_start), block_q), lo,
                   n_q_blocks)
        return (lo, a, True), (a, n_q_blocks, False)
    lo = jnp.minimum(lax.div((j0 + 1) * g + (w - 1), block_q), n_q_blocks)
    a = _clamp(_cdiv((j0 + block_c) * g + (w - 1), block_q), lo, n_q_blocks)
    return (lo, a, True), (a, n_q_blocks, False)


def block_loops(segments, body, carry):
    """carry = body(masked)(i, carry) for i over each segment, in order."""
    for start, stop, masked in segments:
        carry = lax.fori_loop(start, stop, body(masked), carry)
    return carry
