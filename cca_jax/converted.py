"""Our converted model directory: config, orbax parameters and tokenizer, written atomically.

Layout of a converted directory:

    cca_config.json     `LlamaConfig.to_json()`
    params/             orbax checkpoint of the pure parameter dict
                        (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`), host numpy arrays
    tokenizer.json, tokenizer_config.json, ... , generation_config.json   (when available)

`save_converted` writes into a temporary sibling and renames it into place only after orbax
has finished, so an interrupted run leaves nothing behind. `load_converted` returns the
config and the parameter dict (numpy arrays, integer layer keys).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from cca_jax.llama import LlamaConfig
from cca_jax.hf import copy_tokenizer_files
from cca_jax.io import atomic_directory
from cca_jax.params import flatten_params, int_keys, unflatten_params

CONFIG_FILE = "cca_config.json"
PARAMS_DIR = "params"


def is_converted_dir(path: str | os.PathLike) -> bool:
    """True if `path` is a directory written by `save_converted`."""
    path = Path(path).expanduser()
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def _to_host(params: Mapping) -> dict:
    """Numpy copies of every leaf (orbax then restores numpy, independent of devices)."""
    return unflatten_params({path: np.asarray(value)
                             for path, value in flatten_params(params).items()})


def save_converted(out_dir: str | os.PathLike, params: Mapping, config: LlamaConfig,
                   tokenizer_src: str | os.PathLike | None = None,
                   overwrite: bool = False) -> Path:
    """Write `config`, `params` and the tokenizer files of `tokenizer_src` to `out_dir`.

    FileExistsError before any work if `out_dir` exists and `overwrite` is false. Returns
    the absolute path of the finished directory.
    """
    import orbax.checkpoint as ocp

    target = Path(out_dir).expanduser().absolute()
    if target.exists() and not overwrite:
        raise FileExistsError(f"output directory {str(target)!r} already exists; pass "
                              "overwrite=True (--overwrite on the command line) to replace it")
    host_params = _to_host(params)
    with atomic_directory(target, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(config.to_json() + "\n")
        checkpointer = ocp.StandardCheckpointer()
        try:
            checkpointer.save((tmp / PARAMS_DIR).absolute(), host_params)
            checkpointer.wait_until_finished()  # async commit must end before the rename
        finally:
            checkpointer.close()
        copy_tokenizer_files(tokenizer_src, tmp)
    return target


def read_converted_config(path: str | os.PathLike, **config_overrides) -> LlamaConfig:
    """The `LlamaConfig` of a converted directory, with fields replaced by the overrides."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise (NotADirectoryError if path.exists() else FileNotFoundError)(
            f"converted model directory {str(path)!r} does not exist or is not a directory")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {str(path)!r}; not a converted cca_jax "
                                "model directory")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(file)!r} is not valid JSON: {err}") from None
    data.update(config_overrides)
    return LlamaConfig.from_dict(data)


def load_converted(path: str | os.PathLike, **config_overrides) -> tuple[LlamaConfig, dict]:
    """(config, params) of a converted directory; params are numpy arrays in stored dtypes."""
    import orbax.checkpoint as ocp

    config = read_converted_config(path, **config_overrides)
    params_dir = (Path(path).expanduser() / PARAMS_DIR).absolute()
    if not params_dir.is_dir():
        raise FileNotFoundError(f"no {PARAMS_DIR}/ checkpoint in {str(params_dir.parent)!r}")
    checkpointer = ocp.StandardCheckpointer()
    try:
        params = checkpointer.restore(params_dir)
    finally:
        checkpointer.close()
    return config, int_keys(params)
