"""Helpers for parameter trees: the nested dicts of `nnx.to_pure_dict(nnx.state(model,
nnx.Param))`, e.g. `{"layers": {0: {"self_attn": {"q_proj": {"kernel": array}}}}}`.

Layer indices are ints in a model's own tree and strings once orbax has stored the tree (and
in the string-keyed trees the trainer shards); `int_keys` and `str_keys` convert between the
two. A parameter's name is its keys joined by dots, `layers.0.self_attn.q_proj.kernel`,
whichever kind its keys are (`param_path_name` for a tuple of keys, `key_path_name` for a jax
key path).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping


def flatten_params(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    """{(key, ...): leaf} of a nested dict; keys kept as they are (layer indices are ints)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def unflatten_params(flat: Mapping[tuple, Any]) -> dict:
    """The nested dict of `flatten_params`' output."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def param_path_name(path: Iterable) -> str:
    """'layers.0.self_attn.q_proj.kernel' for a parameter path (a tuple of keys)."""
    return ".".join(str(key) for key in path)


def key_path_name(path) -> str:
    """The same name for a jax key path (`jax.tree_util.tree_map_with_path`'s entries)."""
    return param_path_name(getattr(entry, "key", getattr(entry, "idx", entry)) for entry in path)


def flat_by_name(tree: Mapping) -> dict[str, Any]:
    """{'layers.0.self_attn.q_proj.kernel': leaf} of a nested dict with int or str keys."""
    return {param_path_name(path): leaf for path, leaf in flatten_params(tree).items()}


def list_names(names: list[str], limit: int | None = None) -> str:
    """'a, b, c', or the first `limit` names and '(and N more)'."""
    if limit is None or len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f" (and {len(names) - limit} more)"


def name_mismatch(given: Iterable[str], wanted: Iterable[str],
                  limit: int | None = None) -> str | None:
    """'missing: a, b; unexpected: c' for the parameter names that are wanted but not given,
    and given but not wanted (each list cut at `limit`), or None when they agree."""
    given, wanted = set(given), set(wanted)
    missing, extra = sorted(wanted - given), sorted(given - wanted)
    problems = ([f"missing: {list_names(missing, limit)}"] if missing else []) + (
        [f"unexpected: {list_names(extra, limit)}"] if extra else [])
    return "; ".join(problems) or None


def int_keys(tree):
    """The tree with layer indices as ints (orbax stores dict keys as strings)."""
    if not isinstance(tree, Mapping):
        return tree
    return {int(k) if isinstance(k, str) and k.isdigit() else k: int_keys(v)
            for k, v in tree.items()}


def str_keys(tree):
    """The tree with every key a string (as orbax stores it)."""
    if not isinstance(tree, Mapping):
        return tree
    return {str(k): str_keys(v) for k, v in tree.items()}
