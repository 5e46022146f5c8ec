"""Logical axis names -> mesh axes: the one rules table, and the shardings derived from it.

Every parameter of `cca_jax.LlamaForCausalLM` carries logical axis names as metadata
(`nnx.with_partitioning`, e.g. `q_proj.kernel` is `("embed", "heads")`). `LOGICAL_AXIS_RULES`
maps each name to mesh axes (`train/mesh.py`); a dimension whose size the mesh axes do not
divide stays whole (replicated along it). The same rules, set with `nnx.logical_axis_rules`,
tell the attention layer how to split q/k/v per shard (`cca_jax.layer.attention_per_shard`).

Parameters are kept as a nested dict of arrays with string keys (what orbax stores), the
"pure" parameter tree; the optimizer state inherits each parameter's sharding.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

# logical name -> mesh axis (or axes). The one table; keep it short.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),   # activations: the batch is split over both batch axes
    ("embed", "fsdp"),             # hidden size: FSDP shards every parameter along it
    ("vocab", "tensor"),           # embedding / lm_head rows split over the tensor axis
    ("heads", "tensor"),           # query heads (q_proj columns, o_proj rows)
    ("kv_heads", "tensor"),        # key/value heads (k_proj, v_proj columns)
    ("mlp", "tensor"),             # MLP width
    ("length", "context"),         # activations: the sequence is split over the context axis
)


def rules_for(config, mesh) -> tuple[tuple[tuple[str, Any], ...], list[str]]:
    """The rules for this model on this mesh, and notes on what had to be left out.

    Tensor parallelism over heads needs whole GQA groups per shard: if the tensor axis does
    not divide both the query and the key/value head counts, heads stay whole (the MLP and
    vocabulary are still split) and a note says so. The heads names are then mapped to no
    mesh axis (replicated), not dropped: a name missing from the rules would be taken for a
    mesh axis of that name by the attention layer's per-shard specs.
    """
    tensor = mesh.shape["tensor"]
    notes = []
    rules = LOGICAL_AXIS_RULES
    if tensor > 1 and (config.num_attention_heads % tensor or config.kv_heads % tensor):
        rules = tuple((name, None) if name in ("heads", "kv_heads") else (name, target)
                      for name, target in rules)
        notes.append(f"heads are not split: {config.num_attention_heads} query / "
                     f"{config.kv_heads} key-value heads are not both multiples of the tensor "
                     f"axis ({tensor}); MLP and vocabulary are still split")
    return rules, notes


def spec_for(logical: tuple | None, shape: tuple[int, ...], mesh,
             rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    """PartitionSpec of an array of `shape` whose dimensions have these logical names."""
    if not logical:
        return PartitionSpec()
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {logical} do not match shape {shape}")
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, size in zip(logical, shape):
        target = table.get(name) if name is not None else None
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1 and a not in used)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        else:
            out.append(None)
    return PartitionSpec(*out)


def logical_axes_of(abstract_model) -> dict:
    """{param path (tuple of str): logical axis names} for every nnx.Param of the model."""
    from flax import nnx

    state = nnx.state(abstract_model, nnx.Param)
    out = {}
    leaves = jax.tree_util.tree_leaves_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for path, var in leaves:
        key = tuple(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        names = var.get_metadata().get("out_sharding")
        if not names:
            raise ValueError(f"parameter {'.'.join(key)} has no logical axis names; every "
                             "parameter needs them (nnx.with_partitioning)")
        out[key] = tuple(names)
    return out


def _path_key(path) -> tuple[str, ...]:
    return tuple(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))


def param_shardings(abstract_params: Mapping, logical: Mapping, mesh, rules) -> dict:
    """NamedSharding for each leaf of the (string-keyed) parameter tree."""
    def one(path, leaf):
        return NamedSharding(mesh, spec_for(logical[_path_key(path)], tuple(leaf.shape), mesh,
                                            rules))
    return jax.tree_util.tree_map_with_path(one, abstract_params)


def state_shardings(abstract_tree, params_shardings: Mapping, mesh):
    """Shardings for any tree whose sub-trees mirror the parameters (optimizer state):
    a leaf at `.../<param path>` with the parameter's shape gets the parameter's sharding,
    everything else (step counters, scalars) is replicated."""
    by_path = {_path_key(p): s for p, s in jax.tree_util.tree_leaves_with_path(params_shardings)}

    def one(path, leaf):
        key = _path_key(path)
        for start in range(len(key)):
            if key[start:] in by_path:
                return by_path[key[start:]]
        if getattr(leaf, "ndim", 0) > 0:
            raise ValueError(f"optimizer state leaf {jax.tree_util.keystr(path)} "
                             f"{tuple(leaf.shape)} mirrors no parameter")
        return NamedSharding(mesh, PartitionSpec())
    return jax.tree_util.tree_map_with_path(one, abstract_tree)


def sharding_report(tree) -> list[dict]:
    """One entry per array: path, shape, spec, devices it lives on, shard shape."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        sharding = leaf.sharding
        out.append({
            "path": jax.tree_util.keystr(path),
            "shape": list(leaf.shape),
            "spec": str(getattr(sharding, "spec", sharding)),
            "devices": len(sharding.device_set),
            "shard_shape": list(sharding.shard_shape(leaf.shape)),
            "fully_replicated": bool(sharding.is_fully_replicated),
        })
    return out


def put_sharded(host_array: np.ndarray, sharding: NamedSharding, dtype) -> jax.Array:
    """Place a host array straight into its shards (each device receives only its block;
    works on several hosts, where each process fills its addressable devices)."""
    host_array = np.asarray(host_array)
    return jax.make_array_from_callback(
        host_array.shape, sharding, lambda index: np.asarray(host_array[index], dtype=dtype))
