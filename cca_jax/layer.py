"""`CCAAttention`: the NNX attention layer (q/k/v/o projections, GQA, RoPE) around the ops of
`cca_jax.attention`, with logical axis names on its parameters and one op call per shard
under a mesh (`attention_per_shard`).

One layer serves training, prefill and decoding: with a layer cache it appends to it
(`cca_jax.cache.attend_cached`), without one it attends over the whole sequence.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cca_jax.attention import causal_attention, cca_attention
from cca_jax.config import DEFAULT_CCA, CCAConfig, check_attention_kind, check_positive_int
from cca_jax.cache import CacheStep, attend_cached
from cca_jax.rope import RotaryEmbedding, apply_rope, normalize_rope_scaling

# Logical axis names of parameters and activations. `train/sharding.py` holds the one table
# that maps them to mesh axes; without a mesh they are inert metadata.
LOGICAL_AXES = ("batch", "vocab", "embed", "heads", "kv_heads", "mlp")


def partitioned(initializer, logical_axes: tuple[str | None, ...]):
    """`initializer` whose parameter carries logical axis names (one per dimension).

    The names are metadata only (`eager_sharding=False`): creating the parameter never needs
    a mesh. A trainer turns them into shardings with its rules table (`train/sharding.py`).
    """
    return nnx.with_partitioning(initializer, tuple(logical_axes), eager_sharding=False)


def _active_mesh_and_rules():
    """(the mesh set with `jax.set_mesh`, the `nnx.logical_axis_rules` as a dict), or
    (None, {}) when either is missing: then nothing is split."""
    from flax.core import spmd as flax_spmd

    mesh = jax.sharding.get_abstract_mesh()
    rules = dict(flax_spmd.get_logical_axis_rules())
    if mesh is None or mesh.empty or not rules:
        return None, {}
    return mesh, rules


def _mapped_axes(rules: dict, logical: str, mesh) -> tuple[str, ...]:
    """Mesh axes of size > 1 that the rules map `logical` to."""
    target = rules.get(logical)
    if target is None:
        return ()
    names = (target,) if isinstance(target, str) else tuple(target)
    return tuple(n for n in names if n in mesh.axis_names and mesh.shape[n] > 1)


def _mesh_axes_for(rules: dict, logical: str, mesh, size: int) -> tuple[str, ...]:
    """Mesh axes (of size > 1) that `logical` maps to, if they divide `size`; else ()."""
    names = _mapped_axes(rules, logical, mesh)
    total = math.prod(mesh.shape[n] for n in names)
    return names if names and size % total == 0 else ()


SEQUENCE_LAYOUTS = ("contiguous", "zigzag")
_SEQUENCE_LAYOUT = contextvars.ContextVar("cca_jax_sequence_layout", default="zigzag")


@contextlib.contextmanager
def sequence_layout(layout: str):
    """Under context parallelism, how a sequence's tokens are laid out over the context axis
    while tracing inside this block (like `nnx.logical_axis_rules`):

    - "zigzag" (the default): the sequence, cut into 2n pieces, is laid out in
      `cca_jax.context.zigzag_order`, shard i holding pieces i and 2n - 1 - i, so every shard
      has as much early (cheap) as late (costly) CCA work; the token loss
      (`train.loss.token_nll`) reorders tokens, targets and RoPE positions to match;
    - "contiguous": shard i holds rows i L/n .. (i + 1) L/n - 1 (the last shard does most
      of the work: 71-85% above the mean at 128K-1M over 8 shards).
    """
    if layout not in SEQUENCE_LAYOUTS:
        raise ValueError(f"layout must be one of {SEQUENCE_LAYOUTS}, got {layout!r}")
    token = _SEQUENCE_LAYOUT.set(layout)
    try:
        yield
    finally:
        _SEQUENCE_LAYOUT.reset(token)


def current_sequence_layout() -> str:
    return _SEQUENCE_LAYOUT.get()


def zigzag_positions(length: int) -> "np.ndarray | None":
    """Under context parallelism with the zigzag layout, the position each laid-out row holds
    (`cca_jax.context.zigzag_order`); None when rows are in order."""
    if current_sequence_layout() != "zigzag" or context_size(length) == 1:
        return None
    from cca_jax.context import zigzag_order

    return zigzag_order(length, context_size(length))


def context_axis(q_length: int | None = None) -> str | None:
    """The mesh axis the sequence is split over (context parallelism), or None.

    Set when a mesh is active (`jax.set_mesh`) with logical axis rules
    (`nnx.logical_axis_rules`) that map the logical axis "length" to one mesh axis of size
    > 1, as `train/sharding.py` maps it to "context". With `q_length`, a length that the axis
    does not divide is an error rather than a silently unsplit sequence."""
    mesh, rules = _active_mesh_and_rules()
    names = _mapped_axes(rules, "length", mesh) if mesh is not None else ()
    if not names:
        return None
    if len(names) > 1:
        raise ValueError(f"the sequence can be split over one mesh axis, but the rules map "
                         f"'length' to {names}")
    if q_length is not None and q_length % mesh.shape[names[0]]:
        raise ValueError(f"a sequence of {q_length} tokens does not split into "
                         f"{mesh.shape[names[0]]} equal shards over the mesh axis "
                         f"{names[0]!r}")
    return names[0]


def context_size(length: int | None = None) -> int:
    """How many shards the sequence is split into (1 without context parallelism)."""
    axis = context_axis(length)
    return 1 if axis is None else jax.sharding.get_abstract_mesh().shape[axis]


def constrain_sequence(x):
    """Under context parallelism, lay x [B, L, ...] out split along L over the context axis
    (and over the batch axes along B): the activations of a long sequence then live in
    shards, and per-token work (embeddings, MLPs, norms, the loss) runs where its tokens
    are. Without it, x is returned unchanged."""
    axis = context_axis(x.shape[1])
    if axis is None:
        return x
    mesh, rules = _active_mesh_and_rules()
    batch = _mesh_axes_for(rules, "batch", mesh, x.shape[0])
    spec = jax.sharding.PartitionSpec(batch or None, axis, *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, spec)


def attention_per_shard(attend, q, k, v, *, context_attend=None):
    """Run `attend(q, k, v)` once per shard with `jax.shard_map` when a mesh is active.

    Active means: a mesh set with `jax.set_mesh` and logical axis rules set with
    `nnx.logical_axis_rules` (as `train/` does). q [B, L, H, d] and k, v [B, L, Hkv, d] are
    split over batch along the mesh axes of the logical axis "batch" and over heads along
    those of "heads" (only when both H and Hkv divide: each shard then keeps whole GQA
    groups), so each device runs the unchanged op (XLA or Pallas) on its own
    [B/n, L, H/t, d] block and no custom partitioning rule for the Pallas kernel is needed.

    The sequence axis is split only under context parallelism (`context_axis()`, the
    logical axis "length" on a mesh axis of size > 1) and only for an op that has a
    per-shard form: `context_attend(q, k, v, axis_name=...)` receives [B/n, L/c, H/t, d]
    and exchanges what it needs over that axis (CCA: `cca_jax.context.cca_attention_shard`,
    core tokens and a halo). An op without one (full attention) is given whole sequences:
    its shard_map leaves the length whole, so the partitioner gathers the sequence first.
    Without a mesh, or when no axis would be split, `attend` is called directly.
    """
    mesh, rules = _active_mesh_and_rules()
    if mesh is None:
        return attend(q, k, v)
    batch = _mesh_axes_for(rules, "batch", mesh, q.shape[0])
    heads = _mesh_axes_for(rules, "heads", mesh, q.shape[2])
    if heads and _mesh_axes_for(rules, "heads", mesh, k.shape[2]) != heads:
        heads = ()
    context = context_axis(q.shape[1])
    order = zigzag_positions(q.shape[1]) if context is not None else None
    if context_attend is None:
        context = None
        if order is not None:
            # Whole sequences in the zigzag layout: attend in position order, lay back out.
            attend = functools.partial(_in_position_order, attend, order)
    if not batch and not heads and context is None:
        return attend(q, k, v)
    spec = jax.sharding.PartitionSpec(batch or None, context, heads or None, None)
    body = attend if context is None else functools.partial(context_attend, axis_name=context)
    if hasattr(jax, "shard_map"):
        # check_vma=False: pallas_call has no varying-manual-axes rule in every jax version.
        return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                             check_vma=False)(q, k, v)
    from jax.experimental.shard_map import shard_map  # jax versions before jax.shard_map
    return shard_map(body, mesh, in_specs=(spec, spec, spec), out_specs=spec,
                     check_rep=False)(q, k, v)


def _in_position_order(attend, order, q, k, v):
    inverse = np.argsort(order)
    out = attend(*(jnp.take(x, inverse, axis=1) for x in (q, k, v)))
    return jnp.take(out, order, axis=1)


class CCAAttention(nnx.Module):
    """A drop-in attention layer for NNX decoders: q/k/v/o projections, GQA, RoPE, and
    either CCA attention (`attention="cca"`) or full causal attention (`"full"`).

    Parameter names follow Hugging Face LLaMA (`q_proj`, `k_proj`, `v_proj`, `o_proj`,
    kernels stored `[in, out]`), so converted weights map one to one.

    Call: `layer(x, positions=None)` with x `[B, L, hidden_size]`; positions `[B, L]`
    integers (default 0..L-1). Returns `[B, L, hidden_size]` in `dtype`.

    Cached call (generation): `layer(x, cache=layer_cache, step=step)` appends the chunk x
    (T tokens per row, at positions `step.start + 0 .. T - 1`) to a layer cache of
    `cca_jax.cache` and returns `(y, new layer cache)`; `step` is this layer's `CacheStep`
    (the model builds one per call and hands each layer `step.for_layer(i)`). The cache's
    kind (`step.spec.attention`) decides the attention, so one set of weights serves a CCA
    and a full cache. Training, prefill and
    decoding share this code.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, *, attention: str = "cca",
                 cca: CCAConfig = DEFAULT_CCA, group_size: int | None = None,
                 window_size: int | None = None, rope_theta: float = 10000.0,
                 rope_scaling=None, max_position_embeddings: int = 2048,
                 qkv_bias: bool = False, out_bias: bool = False, dtype=jnp.float32,
                 param_dtype=jnp.float32, implementation: str | None = None, rngs: nnx.Rngs):
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads)):
            check_positive_int(name, value)
        if not isinstance(cca, CCAConfig):
            raise TypeError(f"cca must be a CCAConfig, got {type(cca).__name__}")
        # group_size=, window_size= and implementation= replace those fields of `cca`.
        cca = cca.updated(group_size=group_size, window_size=window_size,
                          implementation=implementation)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads "
                                 f"({num_heads}) unless head_dim is given")
            head_dim = hidden_size // num_heads
        check_positive_int("head_dim", head_dim)
        check_attention_kind(attention)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.attention, self.cca = attention, cca
        self.dtype = dtype
        self.rope = RotaryEmbedding(head_dim, float(rope_theta),
                                    normalize_rope_scaling(rope_scaling)
                                    if not isinstance(rope_scaling, tuple) else rope_scaling,
                                    max_position_embeddings)

        def linear(n_in, n_out, bias, axes):
            return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                              kernel_init=partitioned(nnx.initializers.lecun_normal(), axes),
                              bias_init=partitioned(nnx.initializers.zeros_init(), axes[1:]),
                              rngs=rngs)

        self.q_proj = linear(hidden_size, num_heads * head_dim, qkv_bias, ("embed", "heads"))
        self.k_proj = linear(hidden_size, num_kv_heads * head_dim, qkv_bias,
                             ("embed", "kv_heads"))
        self.v_proj = linear(hidden_size, num_kv_heads * head_dim, qkv_bias,
                             ("embed", "kv_heads"))
        self.o_proj = linear(num_heads * head_dim, hidden_size, out_bias, ("heads", "embed"))

    @property
    def group_size(self) -> int:
        return self.cca.group_size

    @property
    def window_size(self) -> int:
        return self.cca.window_size

    @property
    def implementation(self) -> str:
        return self.cca.implementation

    def _check_input(self, x) -> None:
        hidden = self.q_proj.in_features
        if getattr(x, "ndim", None) != 3 or x.shape[-1] != hidden:
            raise ValueError(f"x must have shape [batch, length, hidden_size={hidden}], got "
                             f"shape {getattr(x, 'shape', type(x).__name__)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}")

    def project_qkv(self, x, positions=None):
        """q [B, L, H, d], k and v [B, L, Hkv, d], with RoPE applied to q and k."""
        self._check_input(x)
        B, L, _ = x.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        q = self.q_proj(x).reshape(B, L, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, L, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, L, self.num_kv_heads, self.head_dim)
        cos, sin = self.rope.cos_sin(positions, q.dtype, seq_len=L)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def __call__(self, x, positions=None, cache=None, step: CacheStep | None = None):
        B, L = x.shape[:2]
        if cache is None:
            if step is not None:
                raise ValueError("step is given without a cache")
            q, k, v = self.project_qkv(x, positions)
            context = self._context_attend if self.attention == "cca" else None
            out = attention_per_shard(self._attend, q, k, v, context_attend=context)
            return self.o_proj(out.reshape(B, L, self.num_heads * self.head_dim))
        if step is None or positions is not None:
            raise ValueError("a cached call takes step= (a cca_jax.cache.CacheStep) and no "
                             "positions (they follow from the cache)")
        q, k, v = self.project_qkv(x, step.positions(L))
        out, cache = attend_cached(step, cache, q, k, v, implementation=self.cca.implementation)
        return self.o_proj(out.reshape(B, L, self.num_heads * self.head_dim)), cache

    def _context_attend(self, q, k, v, *, axis_name: str):
        """CCA of one sequence shard (context parallelism, `cca_jax.context.cca_attention_shard`
        in the current `sequence_layout`): the Pallas kernels on a GPU ("auto"), the blocked
        XLA engine elsewhere."""
        from cca_jax.context import cca_attention_shard

        shard, g = q.shape[1], self.cca.group_size
        layout = current_sequence_layout()
        pieces = 2 if layout == "zigzag" else 1
        if shard % (pieces * g):
            raise ValueError(
                f"context parallelism ({layout} layout) needs each sequence shard to hold "
                f"{'two pieces of ' if pieces == 2 else ''}whole groups: a shard of {shard} "
                f"tokens (the sequence length / the {axis_name!r} axis size "
                f"{jax.lax.axis_size(axis_name)}) is not a multiple of "
                f"{'2 x ' if pieces == 2 else ''}group_size {g}; use a sequence length that "
                f"is a multiple of {'2 x ' if pieces == 2 else ''}group_size x the context "
                "axis")
        # The dense reference has no per-shard form: its shards run the blocked engine.
        implementation = self.cca.implementation
        implementation = "xla" if implementation == "reference" else implementation
        return cca_attention_shard(q, k, v, axis_name=axis_name, group_size=g,
                                   window_size=self.cca.window_size, layout=layout,
                                   implementation=implementation)

    def _attend(self, q, k, v):
        if self.attention == "cca":
            return cca_attention(q, k, v, group_size=self.cca.group_size,
                                 window_size=self.cca.window_size,
                                 implementation=self.cca.implementation)
        # Full attention has no Pallas kernel of ours: "pallas" means the fastest path.
        impl = "auto" if self.cca.implementation == "pallas" else self.cca.implementation
        return causal_attention(q, k, v, implementation=impl)
