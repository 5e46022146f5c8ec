"""Decode state for cached generation: the compressed CCA cache (docs/cca.md §5) or a full
KV cache, behind one interface, plus the cached forward passes of a `LlamaForCausalLM`.

Layout (static shapes, preallocated for `max_length` tokens; B = batch, H / Hkv = query / KV
heads, d = head dim, g / w = group size / window):

`CCALayerCache` (per layer)
    core_k, core_v   [B, C, H, d]  model dtype. Core token j of each query head, in slot j.
                                   C = visible_core_count(max_length - 1, g, w)
                                     = floor((max_length - w) / g): the most any query sees.
    raw_k, raw_v     [B, R, Hkv, d] model dtype. Ring of raw keys/values: position n lives in
                                   slot n % R, R = min(w + g, max_length). It always holds
                                   every position a query may still see raw.
`FullLayerCache` (per layer)
    k, v             [B, max_length, Hkv, d]; position n in slot n.
`DecodeCache`
    layers           tuple of the above, one per decoder layer: layer i's kind is
                     `spec.layer_attention(i)` (hybrid models mix both, each sized for its kind)
    lengths          [B] int32: tokens cached per sequence (= position of the next token)
    spec             `CacheSpec` (static, not a leaf)

Per decoded token at position t (docs/cca.md §5): its k, v go to raw slot t % R; if t closes
group j (`(t + 1) % g == 0`, j = (t + 1) / g - 1), its query weighs the group's keys (all
still in the ring) and the group's core token is pooled at once into core slot j (groups
j >= C never become visible and are not stored). A slot is written before any query can see
it: query t sees core slots j < c(t) = `visible_core_count(t, g, w)`, groups that closed
at least w positions earlier, and the raw slots holding positions c(t) * g .. t, all in one
softmax (`cca_kernels.decode`). Pooling at closing time computes the same products as
pooling when the group becomes visible, with no pooling weights to keep in between.
Cache bytes per layer and sequence: (w + g) * Hkv * d * 2 + floor((L - w) / g) * H * d * 2
values (docs/cca.md §5).

Sequences of different lengths: the prompts are right-aligned to start at column 0 (see
`normalize_padding`); each sequence has its own `lengths` entry, its own positions starting
at 0 and its own visibility, so padding never reaches a core token or a softmax.

One forward path: `LlamaForCausalLM.__call__(ids, cache=...)` threads a cache through the
same decoder modules that training uses; `attend_cached` is the attention step of one layer.
(One exception by construction: "dynamic" NTK RoPE scales with the static length of the
call, so past max_position_embeddings a decode step and a full pass rotate differently, as in
transformers.) Decode steps must keep every length below `max_length`: inside jit nothing
can be checked, and `cca_jax.generate` sizes the cache so that it never happens.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from cca_jax.attention import causal_attention, cca_attention, cudnn_supported
from cca_jax.config import (ATTENTION_KINDS, DEFAULT_CCA, CCAConfig, accepts_cca_keywords,
                            check_layer_indices, layer_attention)
from cca_jax.reference import compute_dtype
from cca_kernels.cca_attention import cca_attention_pallas
from cca_kernels.decode import MASK_VALUE, decode_attention_pallas, decode_attention_reference
from cca_kernels.visibility import raw_window_start, visible_core_count

DECODE_IMPLEMENTATIONS = ("auto", "jnp", "pallas")
_HIGHEST = jax.lax.Precision.HIGHEST


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@accepts_cca_keywords({"group_size": "group_size", "window_size": "window_size"})
@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Everything static about a cache (hashable; part of the jitted functions' signature).

    `cca` holds g and w (the model's `LlamaConfig.cca`); `group_size=` / `window_size=` are
    accepted as keywords and read back as properties. `full_attention_layers`: the layers
    that hold a full cache while the others hold `attention`'s (a hybrid model's
    `LlamaConfig.full_attention_layers`); stored sorted, and emptied when attention="full"
    (every layer is full then), so that equal caches have equal specs. The layer functions
    below (`prefill_layer`, `decode_layer`, `append_layer`) take the spec of one layer,
    `layer_spec(i)`, whose `attention` is that layer's kind."""

    attention: str       # "cca" or "full"
    batch_size: int
    max_length: int      # tokens per sequence the cache can hold (prompt + generated)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    cca: CCAConfig = DEFAULT_CCA
    dtype: str = "float32"
    full_attention_layers: tuple = ()

    def __post_init__(self):
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got "
                             f"{self.attention!r}")
        for name in ("batch_size", "max_length", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim"):
            _check_int(name, getattr(self, name))
        if not isinstance(self.cca, CCAConfig):
            raise TypeError(f"cca must be a CCAConfig, got {type(self.cca).__name__}")
        layers = check_layer_indices(self.full_attention_layers, self.num_layers)
        object.__setattr__(self, "full_attention_layers",
                           () if self.attention == "full" else layers)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        jnp.dtype(self.dtype)

    @property
    def core_capacity(self) -> int:
        """C: core tokens the last position can see, floor((max_length - w) / g) or 0."""
        return visible_core_count(self.max_length - 1, self.group_size, self.window_size)

    @property
    def raw_capacity(self) -> int:
        """R: raw ring slots (w + g, or max_length if that is smaller)."""
        return min(self.window_size + self.group_size, self.max_length)

    def layer_attention(self, index: int) -> str:
        """"cca" or "full": the kind of layer `index`'s cache (`config.layer_attention`)."""
        if not 0 <= index < self.num_layers:
            raise IndexError(f"layer {index} of a cache of {self.num_layers} layers")
        return layer_attention(self, index)

    def layer_spec(self, index: int) -> "CacheSpec":
        """The spec of layer `index` alone: this spec with `attention` set to the layer's
        kind and no hybrid list (what the one-layer functions read)."""
        kind = self.layer_attention(index)
        if kind == self.attention and not self.full_attention_layers:
            return self
        return dataclasses.replace(self, attention=kind, full_attention_layers=())

    @classmethod
    def for_model(cls, config, batch_size: int, max_length: int, attention: str | None = None):
        """The spec of a cache for a `LlamaConfig`; attention None means config.attention.
        The config's `full_attention_layers` hold full caches unless attention is "full"
        (then every layer does)."""
        return cls(attention=config.attention if attention is None else attention,
                   batch_size=batch_size, max_length=max_length,
                   num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
                   num_kv_heads=config.kv_heads, head_dim=config.head_size, cca=config.cca,
                   dtype=config.dtype, full_attention_layers=config.full_attention_layers)


@struct.dataclass
class CCALayerCache:
    core_k: jax.Array
    core_v: jax.Array
    raw_k: jax.Array
    raw_v: jax.Array


@struct.dataclass
class FullLayerCache:
    k: jax.Array
    v: jax.Array


@struct.dataclass
class DecodeCache:
    layers: tuple
    lengths: jax.Array
    spec: CacheSpec = struct.field(pytree_node=False)


def init_layer_cache(spec: CacheSpec):
    """A zero-filled layer cache of `spec.attention`'s kind (a one-layer spec,
    `CacheSpec.layer_spec`)."""
    B, H, Hkv, d = spec.batch_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
    dtype = jnp.dtype(spec.dtype)
    if spec.attention == "full":
        shape = (B, spec.max_length, Hkv, d)
        return FullLayerCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
    C, R = spec.core_capacity, spec.raw_capacity
    return CCALayerCache(
        core_k=jnp.zeros((B, C, H, d), dtype), core_v=jnp.zeros((B, C, H, d), dtype),
        raw_k=jnp.zeros((B, R, Hkv, d), dtype), raw_v=jnp.zeros((B, R, Hkv, d), dtype))


def init_cache(spec: CacheSpec) -> DecodeCache:
    """A zero-filled cache (nothing cached yet), each layer of its own kind. Use under
    `jax.eval_shape` to size one."""
    layers = tuple(init_layer_cache(spec.layer_spec(i)) for i in range(spec.num_layers))
    return DecodeCache(layers=layers, lengths=jnp.zeros((spec.batch_size,), jnp.int32),
                       spec=spec)


def cache_nbytes(tree) -> int:
    """Bytes allocated by the arrays of a pytree (real arrays or `jax.eval_shape` results)."""
    return int(sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
                   for leaf in jax.tree_util.tree_leaves(tree)))


def cache_bytes_for(spec: CacheSpec) -> int:
    """Bytes a cache of this spec allocates, read from its arrays without allocating them
    (each layer counted by its kind)."""
    return cache_nbytes(jax.eval_shape(lambda: init_cache(spec)))


def cache_bytes_by_kind(spec: CacheSpec) -> dict[str, tuple[int, int]]:
    """{kind: (layers, bytes)} for the kinds present in a cache of this spec ("cca",
    "full"), read from the layers' arrays like `cache_bytes_for` (whose total they add up
    to, less the [B] lengths)."""
    kinds = [spec.layer_attention(i) for i in range(spec.num_layers)]
    out = {}
    for kind in ATTENTION_KINDS:
        if kind in kinds:
            one = dataclasses.replace(spec, attention=kind, full_attention_layers=())
            nbytes = cache_nbytes(jax.eval_shape(lambda: init_layer_cache(one)))
            out[kind] = (kinds.count(kind), kinds.count(kind) * nbytes)
    return out


# ---------------------------------------------------------------------------------------
# Host-side input handling.


def normalize_padding(input_ids, attention_mask=None):
    """Right-align a padded batch of prompts (numpy, before any device work).

    input_ids [B, L] integers; attention_mask [B, L] of 0/1 (None: no padding) with each row's
    ones contiguous (left or right padding). Returns (ids [B, max length] int32 with every
    prompt starting at column 0 and zeros after it, lengths [B] int32, starts [B] int64: the
    column of each prompt's first token in the input).
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be an integer array [batch, length], got shape "
                         f"{ids.shape} dtype {ids.dtype}")
    B, L = ids.shape
    if B < 1 or L < 1:
        raise ValueError(f"input_ids must hold at least one token per sequence (the prompt "
                         f"cannot be empty), got shape {ids.shape}")
    if attention_mask is None:
        mask = np.ones((B, L), bool)
    else:
        mask = np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {ids.shape}, "
                             f"got {mask.shape}")
        if not np.all((mask == 0) | (mask == 1)):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        mask = mask.astype(bool)
    lengths = mask.sum(axis=1)
    if np.any(lengths == 0):
        rows = np.flatnonzero(lengths == 0).tolist()
        raise ValueError(f"empty prompt: attention_mask has no tokens in row(s) {rows}")
    starts = mask.argmax(axis=1)
    columns = np.arange(L)[None, :]
    contiguous = mask == ((columns >= starts[:, None]) & (columns < (starts + lengths)[:, None]))
    if not contiguous.all():
        rows = np.flatnonzero(~contiguous.all(axis=1)).tolist()
        raise ValueError(f"attention_mask rows {rows} are not one contiguous run of ones "
                         "(only left or right padding is supported)")
    width = int(lengths.max())
    gather = np.minimum(starts[:, None] + np.arange(width)[None, :], L - 1)
    out = np.where(np.arange(width)[None, :] < lengths[:, None],
                   np.take_along_axis(ids, gather, axis=1), 0)
    return out.astype(np.int32), lengths.astype(np.int32), starts


def resolve_decode_implementation(implementation: str, head_dim: int) -> str:
    """"auto": the Pallas split-K kernel on a GPU (power-of-2 head dims), jnp elsewhere."""
    if implementation not in DECODE_IMPLEMENTATIONS:
        raise ValueError(f"decode implementation must be one of {DECODE_IMPLEMENTATIONS}, "
                         f"got {implementation!r}")
    if implementation == "auto":
        gpu = jax.default_backend() == "gpu"
        return "pallas" if gpu and head_dim & (head_dim - 1) == 0 else "jnp"
    return implementation


# ---------------------------------------------------------------------------------------
# Attention-level cache operations (one layer).


def _rows_set(array, index, values):
    """array[b, index[b]] = values[b] for every row b (in place under jit with donation)."""
    return jax.vmap(lambda a, i, x: jax.lax.dynamic_update_index_in_dim(a, x, i, axis=0))(
        array, index, values)


def _rows_get(array, index):
    """array[b, index[b]] for every row b."""
    return jax.vmap(lambda a, i: jax.lax.dynamic_index_in_dim(a, i, axis=0, keepdims=False))(
        array, index)


def _group_weights(q_last, k_group, scale):
    """Pooling weights (docs/cca.md §1) of groups: q_last [B, J, H, d] (the query of each
    group's last token), k_group [B, J, g, Hkv, d] -> [B, J, H, g] float32 (or wider)."""
    B, J, H, d = q_last.shape
    Hkv = k_group.shape[3]
    ct = compute_dtype(q_last.dtype)
    q5 = q_last.astype(ct).reshape(B, J, Hkv, H // Hkv, d)
    logits = jnp.einsum("bjkrd,bjikd->bjkri", q5, k_group.astype(ct), precision=_HIGHEST)
    return jax.nn.softmax(logits * scale, axis=-1).reshape(B, J, H, -1)


def _pool(weights, k_group, v_group, dtype):
    """Core tokens from pooling weights [B, J, H, g] and a group's keys/values
    [B, J, g, Hkv, d] -> (core_k, core_v) [B, J, H, d] in `dtype`."""
    B, J, H, g = weights.shape
    Hkv, d = k_group.shape[3:]
    w5 = weights.reshape(B, J, Hkv, H // Hkv, g)
    ct = weights.dtype
    ck = jnp.einsum("bjkri,bjikd->bjkrd", w5, k_group.astype(ct), precision=_HIGHEST)
    cv = jnp.einsum("bjkri,bjikd->bjkrd", w5, v_group.astype(ct), precision=_HIGHEST)
    return ck.reshape(B, J, H, d).astype(dtype), cv.reshape(B, J, H, d).astype(dtype)


def _check_prefill_shapes(spec: CacheSpec, q, k):
    B, L, H, d = q.shape
    if (B, H, d) != (spec.batch_size, spec.num_heads, spec.head_dim) or k.shape[2] != (
            spec.num_kv_heads):
        raise ValueError(f"q {q.shape} / k {k.shape} do not match the cache spec (batch "
                         f"{spec.batch_size}, heads {spec.num_heads}/{spec.num_kv_heads}, "
                         f"head_dim {spec.head_dim})")
    if L > spec.max_length:
        raise ValueError(f"the prompt ({L} tokens) is longer than the cache "
                         f"(max_length={spec.max_length})")


def prefill_layer(spec: CacheSpec, q, k, v, lengths):
    """The layer cache after a prompt, from its full-sequence q [B, L, H, d] (after RoPE),
    k, v [B, L, Hkv, d] (right-aligned; row b's tokens are 0 .. lengths[b] - 1)."""
    _check_prefill_shapes(spec, q, k)
    B, L, H, d = q.shape
    dtype = jnp.dtype(spec.dtype)
    if spec.attention == "full":
        shape = (B, spec.max_length, spec.num_kv_heads, d)
        cache_k = jax.lax.dynamic_update_slice_in_dim(jnp.zeros(shape, dtype), k.astype(dtype),
                                                      0, axis=1)
        cache_v = jax.lax.dynamic_update_slice_in_dim(jnp.zeros(shape, dtype), v.astype(dtype),
                                                      0, axis=1)
        return FullLayerCache(k=cache_k, v=cache_v)

    g = spec.group_size
    C, R = spec.core_capacity, spec.raw_capacity
    scale = 1.0 / math.sqrt(d)
    last = lengths.astype(jnp.int32) - 1
    # Raw ring: slot s holds the latest position n <= last with n % R == s.
    slot = jnp.arange(R, dtype=jnp.int32)
    position = last[:, None] - (last[:, None] - slot[None, :]) % R
    take = jnp.clip(position, 0, L - 1)[:, :, None, None]
    raw_k = jnp.take_along_axis(k, take, axis=1).astype(dtype)
    raw_v = jnp.take_along_axis(v, take, axis=1).astype(dtype)

    core_k = jnp.zeros((B, C, H, d), dtype)
    core_v = jnp.zeros((B, C, H, d), dtype)
    n = min(L // g, C)   # complete groups of the (padded) prompt block that have a slot
    if n:
        # Every closed group is pooled now. Slots at or past a row's own closed groups hold
        # padding-derived values: the row closes those groups (and rewrites the slots) before
        # any of its queries can see them.
        k_group = k[:, :n * g].reshape(B, n, g, spec.num_kv_heads, d)
        v_group = v[:, :n * g].reshape(B, n, g, spec.num_kv_heads, d)
        weights = _group_weights(q[:, g - 1:n * g:g], k_group, scale)
        ck, cv = _pool(weights, k_group, v_group, dtype)
        core_k = core_k.at[:, :n].set(ck)
        core_v = core_v.at[:, :n].set(cv)
    return CCALayerCache(core_k=core_k, core_v=core_v, raw_k=raw_k, raw_v=raw_v)


def decode_layer(spec: CacheSpec, layer_cache, q, k, v, positions, *,
                 implementation: str = "jnp", interpret: bool = False):
    """Append one token per sequence and attend with it.

    q [B, H, d] (after RoPE), k, v [B, Hkv, d], positions [B] (the new token's position in
    each sequence, = the cache's lengths). Returns (attention output [B, H, d] in q.dtype,
    new layer cache). implementation "jnp" or "pallas" (resolved, not "auto").
    """
    dtype = jnp.dtype(spec.dtype)
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d)
    t = positions.astype(jnp.int32)
    attend = (decode_attention_reference if implementation == "jnp" else
              lambda *a, **kw: decode_attention_pallas(*a, interpret=interpret, **kw))

    if spec.attention == "full":
        cache_k = _rows_set(layer_cache.k, t, k.astype(dtype))
        cache_v = _rows_set(layer_cache.v, t, v.astype(dtype))
        valid = jnp.arange(spec.max_length)[None, :] <= t[:, None]
        out = attend(q, cache_k, cache_v, valid, scale=scale)
        return out, FullLayerCache(k=cache_k, v=cache_v)

    g, w = spec.group_size, spec.window_size
    C, R = spec.core_capacity, spec.raw_capacity
    raw_k = _rows_set(layer_cache.raw_k, t % R, k.astype(dtype))
    raw_v = _rows_set(layer_cache.raw_v, t % R, v.astype(dtype))
    core_k, core_v = layer_cache.core_k, layer_cache.core_v
    if C:
        # This token closes group j = (t + 1) / g - 1 when (t + 1) % g == 0: its query weighs
        # the group's keys (the last g ring slots) and the core token goes to slot j at once.
        closes = ((t + 1) % g == 0) & ((t + 1) // g <= C)
        j = jnp.clip((t + 1) // g - 1, 0, C - 1)
        take = ((j[:, None] * g + jnp.arange(g, dtype=jnp.int32)[None, :]) % R)
        take = take[:, :, None, None]
        k_group = jnp.take_along_axis(raw_k, take, axis=1)[:, None]    # [B, 1, g, Hkv, d]
        v_group = jnp.take_along_axis(raw_v, take, axis=1)[:, None]
        weights = _group_weights(q[:, None], k_group, scale)
        ck, cv = _pool(weights, k_group, v_group, dtype)
        keep = closes[:, None, None]
        core_k = _rows_set(core_k, j, jnp.where(keep, ck[:, 0], _rows_get(core_k, j)))
        core_v = _rows_set(core_v, j, jnp.where(keep, cv[:, 0], _rows_get(core_v, j)))
    count = visible_core_count(t, g, w)

    # Slot s holds the latest position n <= t with n % R == s; visible iff n >= c(t) * g.
    slot = jnp.arange(R, dtype=jnp.int32)
    position = t[:, None] - (t[:, None] - slot[None, :]) % R
    valid = position >= raw_window_start(t, g, w)[:, None]
    if C:
        out = attend(q, raw_k, raw_v, valid, core_k, core_v, count, scale=scale)
    else:
        out = attend(q, raw_k, raw_v, valid, scale=scale)
    return out, CCALayerCache(core_k=core_k, core_v=core_v, raw_k=raw_k, raw_v=raw_v)


# ---------------------------------------------------------------------------------------
# Appending a chunk of tokens (chunked prefill; T = 1 is a decode step).


def _einsum32(equation, a, b):
    """A product accumulated in float32 (full precision for float32 operands)."""
    precision = _HIGHEST if a.dtype == jnp.float32 else None
    return jnp.einsum(equation, a, b, precision=precision, preferred_element_type=jnp.float32)


def _online_update(state, scores, visible, values, equation):
    """One block of an online softmax. state (acc [B, Hkv, r, Q, d], max, sum [B, Hkv, r,
    Q]) float32; scores [B, Hkv, r, Q, n] float32, visible broadcastable to it; values
    multiplied in by `equation` (probabilities cast to the values' dtype)."""
    acc, m, l = state
    scores = jnp.where(visible, scores, MASK_VALUE)
    m_new = jnp.maximum(m, scores.max(axis=-1))
    p = jnp.exp(scores - m_new[..., None])
    correction = jnp.exp(m - m_new)
    l = l * correction + p.sum(axis=-1)
    acc = acc * correction[..., None] + _einsum32(equation, p.astype(values.dtype), values)
    return acc, m_new, l


def _block_slice(array, block: int, index, limit: int):
    """array[:, s : s + block] along axis 1 with s = min(index * block, limit - block) (never
    past the end) and the position of its first row, s."""
    start = jnp.minimum(index * block, limit - block)
    return jax.lax.dynamic_slice_in_dim(array, start, block, axis=1), start


def _chunk_attention(q, *, keys, values, key_mask, n_keys, block_k, core=None):
    """Attention of a block of queries q [B, Q, H, d] over keys [B, N,
    Hkv, d] (and optionally core tokens), one softmax, blocked over the keys so that no [Q, N]
    array exists. key_mask(key_positions [Kb]) -> visible [B, Q, Kb] for keys; n_keys: a
    traced int, how many leading keys can be visible (the loop stops there). core: None or
    (core_k, core_v [B, C, H, d], counts [B, Q] visible core tokens per query, n_core).
    Returns [B, Q, H, d] in q.dtype."""
    B, Q, H, d = q.shape
    N, Hkv = keys.shape[1], keys.shape[2]
    r = H // Hkv
    q5 = q.reshape(B, Q, Hkv, r, d)
    scale = 1.0 / math.sqrt(d)
    state = (jnp.zeros((B, Hkv, r, Q, d), jnp.float32),
             jnp.full((B, Hkv, r, Q), -jnp.inf, jnp.float32),
             jnp.zeros((B, Hkv, r, Q), jnp.float32))
    if core is not None:
        core_k, core_v, counts, n_core = core
        C = core_k.shape[1]
        bc = min(block_k, C)
        ck5, cv5 = (x.reshape(B, C, Hkv, r, d) for x in (core_k, core_v))

        def core_block(j, state):
            kb, start = _block_slice(ck5, bc, j, C)
            vb, _ = _block_slice(cv5, bc, j, C)
            slots = start + jnp.arange(bc, dtype=jnp.int32)
            # A clamped last block overlaps the one before it: count each slot once.
            visible = (slots[None, None, :] < counts[:, :, None]) & (slots >= j * bc)
            scores = _einsum32("bqkrd,bnkrd->bkrqn", q5, kb) * scale
            return _online_update(state, scores, visible[:, None, None], vb,
                                  "bkrqn,bnkrd->bkrqd")

        state = jax.lax.fori_loop(0, -(-n_core // bc), core_block, state)

    bk = min(block_k, N)

    def key_block(j, state):
        kb, start = _block_slice(keys, bk, j, N)
        vb, _ = _block_slice(values, bk, j, N)
        slots = start + jnp.arange(bk, dtype=jnp.int32)
        visible = key_mask(slots) & (slots >= j * bk)[None, None, :]
        scores = _einsum32("bqkrd,bnkd->bkrqn", q5, kb) * scale
        return _online_update(state, scores, visible[:, None, None], vb, "bkrqn,bnkd->bkrqd")

    acc, _, l = jax.lax.fori_loop(0, -(-n_keys // bk), key_block, state)
    out = acc / l[..., None]                       # every query sees at least itself
    return out.transpose(0, 3, 1, 2, 4).reshape(B, Q, H, d).astype(q.dtype)


def _scatter_rows(array, index, values):
    """array[b, index[b, i]] = values[b, i]; indices out of range are dropped."""
    rows = jnp.arange(array.shape[0])[:, None]
    return array.at[rows, index].set(values.astype(array.dtype), mode="drop")


FULL_APPEND_IMPLEMENTATIONS = ("blocked", "cudnn", "xla")


def _attention_lse(q, k, v, kv_lengths, *, causal: bool, implementation: str):
    """Softmax attention of q [B, T, H, d] over k, v [B, S, Hkv, d] (GQA) with each query's
    log-sum-exp of its scaled scores: (out [B, T, H, d] in q.dtype, lse [B, T, H] float32).
    causal: query i sees keys 0 .. i; otherwise row b sees keys 0 .. kv_lengths[b] - 1.
    "cudnn": cuDNN's fused kernel (its float32 softmax statistics; jax.nn's wrapper rounds
    them to the output dtype, too coarse to merge bf16 parts, so the cuDNN call is jax's own
    one underneath it). "xla": jax.nn's XLA path, which builds [T, S] scores (tests)."""
    B, T = q.shape[:2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    if implementation == "xla":
        out, lse = jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=causal,
            key_value_seq_lengths=None if causal else kv_lengths, implementation="xla",
            return_residual=True)
        return out, lse.astype(jnp.float32)
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

    if causal:
        out, lse = cudnn_attention(q, k, v, scale=scale, mask_type=MaskType.CAUSAL,
                                   return_residual=True)
    else:
        out, lse = cudnn_attention(q, k, v, None, None, jnp.full((B,), T, jnp.int32),
                                   kv_lengths.astype(jnp.int32), scale=scale,
                                   mask_type=MaskType.PADDING, return_residual=True)
    return out, jnp.swapaxes(lse, 1, 2).astype(jnp.float32)     # cuDNN's is [B, H, T]


def _append_full_merged(q, cache_k, cache_v, k, v, start, implementation: str):
    """Full attention of a chunk (q [B, T, H, d], its own k, v [B, T, Hkv, d]) whose rows
    start at positions `start` [B], with the cache (cache_k, cache_v [B, M, Hkv, d]) holding
    positions 0 .. start - 1: one fused call over the cached prefix (no mask, start keys per
    row), one causal call over the chunk itself, and the two merged by their log-sum-exp
    (one softmax over both, computed in float32)."""
    has_prefix = start > 0
    out_prefix, lse_prefix = _attention_lse(q, cache_k, cache_v, jnp.maximum(start, 1),
                                            causal=False, implementation=implementation)
    out_self, lse_self = _attention_lse(q, k, v, None, causal=True,
                                        implementation=implementation)
    lse_prefix = jnp.where(has_prefix[:, None, None], lse_prefix, -jnp.inf)
    top = jnp.maximum(lse_prefix, lse_self)
    a_prefix = jnp.exp(lse_prefix - top)[..., None]
    a_self = jnp.exp(lse_self - top)[..., None]
    out = (out_prefix.astype(jnp.float32) * a_prefix + out_self.astype(jnp.float32) * a_self)
    return (out / (a_prefix + a_self)).astype(q.dtype)


def append_layer(spec: CacheSpec, layer_cache, q, k, v, start, count, *, block_q: int = 256,
                 block_k: int = 512, full_implementation: str = "blocked"):
    """Append a chunk of T tokens per sequence to a layer cache and attend with their queries.

    q [B, T, H, d] (after RoPE), k, v [B, T, Hkv, d]: the chunk's columns i = 0 .. T - 1 are
    positions start[b] + i of row b; only the first count[b] (0 <= count <= T) are real
    tokens: the rest are padding, never stored and never seen by a real query. Returns
    (attention output [B, T, H, d] in q.dtype, rows' padding columns unspecified; the new
    layer cache). Computes exactly what `prefill_layer` followed by decode steps computes
    (docs/cca.md §2 and §5), blocked: the queries in blocks of `block_q`, the keys of each
    block in blocks of `block_k` with an online softmax, so no [T, T] or [T, L] array exists.
    Full attention can instead run `full_implementation` "cudnn" (a GPU: two fused cuDNN
    calls merged by log-sum-exp, `_append_full_merged`) or "xla" (the same merge over XLA
    attention, which builds [T, L] scores: for tests).
    """
    B, T, H, d = q.shape
    dtype = jnp.dtype(spec.dtype)
    start = start.astype(jnp.int32)
    count = count.astype(jnp.int32)
    column = jnp.arange(T, dtype=jnp.int32)
    positions = start[:, None] + column[None, :]                    # [B, T]
    real = column[None, :] < count[:, None]
    bq = min(block_q, T)
    n_blocks = -(-T // bq)
    Tp = n_blocks * bq

    def pad_t(x):
        return x if Tp == T else jnp.pad(x, ((0, 0), (0, Tp - T)) + ((0, 0),) * (x.ndim - 2))

    if spec.attention == "full":
        M = spec.max_length
        index = jnp.where(real, positions, M)
        cache_k = _scatter_rows(layer_cache.k, index, k)
        cache_v = _scatter_rows(layer_cache.v, index, v)
        if full_implementation != "blocked":
            if full_implementation not in FULL_APPEND_IMPLEMENTATIONS:
                raise ValueError(f"full_implementation must be one of "
                                 f"{FULL_APPEND_IMPLEMENTATIONS}, got {full_implementation!r}")
            # The prefix call reads `start` keys per row: not this chunk's, written above.
            out = _append_full_merged(q, cache_k, cache_v, k.astype(dtype), v.astype(dtype),
                                      start, full_implementation)
            return out, FullLayerCache(k=cache_k, v=cache_v)
        qp, pos_p = pad_t(q), pad_t(positions)

        def query_block(i):
            qb = jax.lax.dynamic_slice_in_dim(qp, i * bq, bq, axis=1)
            pb = jax.lax.dynamic_slice_in_dim(pos_p, i * bq, bq, axis=1)
            return _chunk_attention(
                qb, keys=cache_k, values=cache_v,
                key_mask=lambda n: n[None, None, :] <= pb[:, :, None],
                n_keys=jnp.minimum(pb.max() + 1, M), block_k=block_k)

        out = jax.lax.map(query_block, jnp.arange(n_blocks))
        out = out.transpose(1, 0, 2, 3, 4).reshape(B, Tp, H, d)[:, :T]
        return out, FullLayerCache(k=cache_k, v=cache_v)

    g, w = spec.group_size, spec.window_size
    C, R = spec.core_capacity, spec.raw_capacity
    scale = 1.0 / math.sqrt(d)
    # The chunk's keys/values behind the ring's: positions start - R .. start + T - 1 (the
    # ring holds every position a query of the chunk can see raw, and the rest of every
    # group that closes during the chunk).
    previous = ((start[:, None] - R + jnp.arange(R, dtype=jnp.int32)[None, :]) % R)
    ext_k = jnp.concatenate([jnp.take_along_axis(layer_cache.raw_k, previous[:, :, None, None],
                                                 axis=1), k.astype(dtype)], axis=1)
    ext_v = jnp.concatenate([jnp.take_along_axis(layer_cache.raw_v, previous[:, :, None, None],
                                                 axis=1), v.astype(dtype)], axis=1)
    E = R + T

    core_k, core_v = layer_cache.core_k, layer_cache.core_v
    if C:
        # Groups that close inside the chunk (at most ceil(T / g)): their last query weighs
        # them and their core tokens go to their slots now (before any query can see them).
        K = -(-T // g)
        first_close = (g - 1 - start) % g                      # column of the first closing
        close_col = first_close[:, None] + g * jnp.arange(K, dtype=jnp.int32)[None, :]
        closed_group = (start[:, None] + close_col + 1) // g - 1         # [B, K]
        stored = (close_col < count[:, None]) & (closed_group < C)
        q_close = jnp.take_along_axis(q, jnp.clip(close_col, 0, T - 1)[:, :, None, None],
                                      axis=1)
        # Keys/values [B, K, g, Hkv, d] of those groups, from their ext columns.
        first = closed_group * g - start[:, None] + R
        take = jnp.clip(first[:, :, None] + jnp.arange(g)[None, None, :], 0, E - 1)
        take = take.reshape(B, -1)[:, :, None, None]
        shape = (B, K, g) + ext_k.shape[2:]
        k_group = jnp.take_along_axis(ext_k, take, axis=1).reshape(shape)
        v_group = jnp.take_along_axis(ext_v, take, axis=1).reshape(shape)
        ck, cv = _pool(_group_weights(q_close, k_group, scale), k_group, v_group, dtype)
        slot = jnp.where(stored, closed_group, C)
        core_k = _scatter_rows(core_k, slot, ck)
        core_v = _scatter_rows(core_v, slot, cv)
    # The ring keeps the last R real positions: slot n % R.
    ring = jnp.where(real & (column[None, :] >= count[:, None] - R), positions % R, R)
    raw_k = _scatter_rows(layer_cache.raw_k, ring, k)
    raw_v = _scatter_rows(layer_cache.raw_v, ring, v)

    ext_kp, ext_vp = pad_t(ext_k), pad_t(ext_v)      # E + Tp - T columns
    qp, pos_p = pad_t(q), pad_t(positions)
    window = min(bq + R, E)

    def query_block(i):
        qb = jax.lax.dynamic_slice_in_dim(qp, i * bq, bq, axis=1)
        pb = jax.lax.dynamic_slice_in_dim(pos_p, i * bq, bq, axis=1)
        # Raw keys a query at column c can see lie in ext columns [c + 1, c + R] (c + R is
        # its own position): the block's queries need the `window` columns from i * bq.
        first = i * bq
        kb = jax.lax.dynamic_slice_in_dim(ext_kp, first, window, axis=1)
        vb = jax.lax.dynamic_slice_in_dim(ext_vp, first, window, axis=1)
        counts = visible_core_count(pb, g, w)
        lowest = counts * g                                  # first visible raw position

        def key_mask(n):
            key_position = start[:, None, None] - R + first + n[None, None, :]
            return (key_position >= lowest[:, :, None]) & (key_position <= pb[:, :, None])

        core = None
        if C:
            core = (core_k, core_v, counts, jnp.minimum(counts.max(), C))
        return _chunk_attention(qb, keys=kb, values=vb, key_mask=key_mask, n_keys=window,
                                block_k=block_k, core=core)

    out = jax.lax.map(query_block, jnp.arange(n_blocks))
    out = out.transpose(1, 0, 2, 3, 4).reshape(B, Tp, H, d)[:, :T]
    return out, CCALayerCache(core_k=core_k, core_v=core_v, raw_k=raw_k, raw_v=raw_v)


# ---------------------------------------------------------------------------------------
# One cached forward call of the model: what its layers share, and the attention step.


@struct.dataclass
class CacheStep:
    """What every layer of one cached forward call shares (built by the model's __call__).

    start [B] int32: tokens each row had cached before the call (the chunk's first position);
    count [B] int32: real tokens of the chunk per row (the rest of its T columns is padding).
    Static: `empty` (nothing is cached yet: every start is 0, and the chunk is attended alone
    with the one-shot kernels), `all_real` (count == T for every row, so T == 1 is a decode
    step), the decode attention implementation ("jnp" or "pallas") and `interpret`.
    """

    start: jax.Array
    count: jax.Array
    spec: CacheSpec = struct.field(pytree_node=False)
    empty: bool = struct.field(pytree_node=False, default=False)
    all_real: bool = struct.field(pytree_node=False, default=True)
    decode_implementation: str = struct.field(pytree_node=False, default="jnp")
    interpret: bool = struct.field(pytree_node=False, default=False)

    def positions(self, length: int):
        """[B, length] positions of the chunk's columns."""
        return self.start[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]

    def for_layer(self, index: int) -> "CacheStep":
        """This step as decoder layer `index` sees it: its spec is the layer's own
        (`CacheSpec.layer_spec`), so `attend_cached` runs the layer's kind."""
        spec = self.spec.layer_spec(index)
        return self if spec is self.spec else self.replace(spec=spec)


def attend_cached(step: CacheStep, layer_cache, q, k, v, *, implementation: str = "auto",
                  scale: float | None = None):
    """Attention of a chunk (q [B, T, H, d] after RoPE, k, v [B, T, Hkv, d]) that is appended
    to `layer_cache`. Returns (out [B, T, H, d], new layer cache).

    Three routes to the same function: an empty cache (the first prompt chunk) runs the
    one-shot attention (`cca_attention` / `causal_attention`, Pallas or cuDNN on a GPU) and
    builds the cache with `prefill_layer`; one real token per row is a decode step
    (`decode_layer`, the split-K kernel on a GPU); anything else is `append_layer`.
    """
    spec = step.spec
    if scale is not None and not math.isclose(scale, 1.0 / math.sqrt(q.shape[-1])):
        raise ValueError("cached attention uses the default scale 1/sqrt(head_dim)")
    if spec.full_attention_layers:
        raise ValueError("attend_cached takes one layer's step (CacheStep.for_layer), not a "
                         "hybrid model's")
    expected = FullLayerCache if spec.attention == "full" else CCALayerCache
    if not step.empty and not isinstance(layer_cache, expected):   # (empty: not read)
        raise TypeError(f"the layer's spec says attention={spec.attention!r}, which needs a "
                        f"{expected.__name__}; got a {type(layer_cache).__name__}")
    T = q.shape[1]
    if step.empty:
        new_cache = prefill_layer(spec, q, k, v, step.count)
        if spec.attention == "cca":
            out = _first_chunk_cca(spec, new_cache, q, k, v, implementation, step.interpret)
        else:
            # Full attention has no Pallas kernel of ours: "pallas" means the fastest path.
            impl = "auto" if implementation == "pallas" else implementation
            out = causal_attention(q, k, v, implementation=impl)
        return out, new_cache
    if T == 1 and step.all_real:
        out, new_cache = decode_layer(spec, layer_cache, q[:, 0], k[:, 0], v[:, 0], step.start,
                                      implementation=step.decode_implementation,
                                      interpret=step.interpret)
        return out[:, None], new_cache
    block_q, block_k = append_blocks(q.shape[0], q.shape[2], T)
    full_implementation = "blocked"
    if spec.attention == "full" and implementation in ("auto", "pallas", "cudnn"):
        # Full attention has no Pallas kernel of ours: "pallas" means the fastest path.
        if cudnn_supported(q):
            full_implementation = "cudnn"
        elif implementation == "cudnn":
            raise ValueError("implementation='cudnn' needs a GPU backend, bf16/fp16 inputs and "
                             "head_dim <= 128 (multiple of 8)")
    return append_layer(spec, layer_cache, q, k, v, step.start, step.count, block_q=block_q,
                        block_k=block_k, full_implementation=full_implementation)


def _first_chunk_cca(spec: CacheSpec, layer_cache, q, k, v, implementation: str,
                     interpret: bool):
    """The one-shot CCA attention of a first prompt chunk. On the Pallas path the kernel takes
    the core tokens that `prefill_layer` has just pooled into the cache (the same groups,
    pooled by the same function in the same compute dtype, stored in q's dtype) instead of
    pooling them a second time: at 2K-4K tokens the extra pooling kernels of every layer cost
    more than the attention kernel saves over cuDNN (cca_kernels/NOTES.md)."""
    g, w = spec.group_size, spec.window_size
    pallas = implementation == "pallas" or (implementation == "auto"
                                            and jax.default_backend() == "gpu")
    if pallas and (interpret or jax.default_backend() == "gpu") and (
            jnp.dtype(spec.dtype) == q.dtype):
        n = visible_core_count(q.shape[1] - 1, g, w)   # <= the groups prefill_layer pooled
        return cca_attention_pallas(q, k, v, layer_cache.core_k[:, :n],
                                    layer_cache.core_v[:, :n], group_size=g, window_size=w,
                                    scale=1.0 / math.sqrt(q.shape[-1]), interpret=interpret)
    return cca_attention(q, k, v, group_size=g, window_size=w, implementation=implementation)


def append_blocks(batch: int, heads: int, length: int) -> tuple[int, int]:
    """Block sizes of `append_layer` (queries, keys): on a GPU as large as keeps one block's
    float32 scores (batch x heads x block_q x block_k) near 2**26 values (256 MB), so that a
    chunk takes few, large products; elsewhere 256 x 512."""
    if jax.default_backend() != "gpu":
        return 256, 512
    budget = 2 ** 26 // max(batch * heads, 1)
    block_q = 1 << max(4, min(10, (budget.bit_length() - 1) // 2))
    block_q = min(block_q, length)
    block_k = 1 << max(4, min(12, (budget // max(block_q, 1)).bit_length() - 1))
    return block_q, block_k


def check_model_matches(model, spec: CacheSpec) -> None:
    """Raise if a cache of `spec` cannot serve `model` (layers, heads, sizes, dtype)."""
    expected = CacheSpec.for_model(model.config, spec.batch_size, spec.max_length,
                                   spec.attention)
    # The op implementation is the layer's to choose; the cache fixes only g and w.
    expected = dataclasses.replace(
        expected, cca=expected.cca.replace(implementation=spec.cca.implementation))
    if expected != spec:
        raise ValueError(f"the cache ({spec}) does not fit the model (it needs {expected})")


# ---------------------------------------------------------------------------------------
# Drivers over the model's own cached forward pass (`LlamaForCausalLM.__call__(ids,
# cache=...)`); both trace under jit.


def prefill(model, spec: CacheSpec, input_ids, lengths, *, chunk_size: int | None = None):
    """Run right-aligned prompts (input_ids [B, L], lengths [B] >= 1; see `normalize_padding`)
    through the model in chunks of `chunk_size` columns (None: one chunk), appending each to
    a new cache. Returns (float32 logits [B, vocab] of each row's last prompt token, the
    cache). Peak activation memory follows the chunk, not L. The chunks are a Python loop:
    under jit each one is traced (`cca_jax.generate` jits one chunk instead)."""
    check_model_matches(model, spec)
    B, L = input_ids.shape
    if B != spec.batch_size:
        raise ValueError(f"input_ids has batch {B}, the cache {spec.batch_size}")
    if L > spec.max_length:
        raise ValueError(f"the prompt ({L} tokens) is longer than the cache "
                         f"(max_length={spec.max_length})")
    chunk = L if chunk_size is None else int(chunk_size)
    _check_int("chunk_size", chunk)
    lengths = jnp.asarray(lengths, jnp.int32)
    cache = init_cache(spec)
    logits = None
    for first in range(0, L, chunk):
        logits, cache = prefill_chunk(model, cache, logits, input_ids[:, first:first + chunk],
                                      lengths, first, empty=first == 0)
    return logits, cache


def prefill_chunk(model, cache: DecodeCache, logits, ids, lengths, first, *, empty: bool):
    """One prompt chunk: ids [B, T] are the columns first .. first + T - 1 of right-aligned
    prompts of `lengths`; each row appends its real tokens among them. logits [B, vocab] (or
    None before the first chunk) keeps each row's last prompt token's logits. Returns
    (logits, cache)."""
    T = ids.shape[1]
    counts = jnp.clip(lengths - first, 0, T)
    chunk_logits, cache = model(ids, cache=cache, counts=counts, cache_empty=empty)
    if logits is None:
        return chunk_logits, cache
    ends_here = (counts > 0) & (lengths <= first + T)
    return jnp.where(ends_here[:, None], chunk_logits, logits), cache


def decode_step(model, cache: DecodeCache, tokens, *, implementation: str = "jnp",
                interpret: bool = False):
    """Append one token per sequence (tokens [B] ints) at positions `cache.lengths`.

    Returns (float32 logits [B, vocab] predicting the next token, updated cache). The caller
    keeps lengths < max_length (inside jit nothing can be checked)."""
    B = cache.spec.batch_size
    return model(tokens.reshape(B, 1).astype(jnp.int32), cache=cache,
                 decode_implementation=implementation, interpret=interpret)
