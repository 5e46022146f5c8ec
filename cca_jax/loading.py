"""Load a pretrained `LlamaForCausalLM` (and its tokenizer) from a directory.

`from_pretrained` accepts either a directory written by `python -m cca_jax.convert` (our
format: `cca_config.json` + orbax `params/`) or a Hugging Face LLaMA / Qwen2 directory
(`config.json` + safetensors or `pytorch_model.bin`), which it converts in memory. The model
is built abstractly (`nnx.eval_shape`, no random initialisation) and its parameters are
filled from the stored arrays after every shape has been checked.

This module is the one owner of reading a model directory: `read_config` (architecture only,
for checks that must come before the slow part) and `read_params` (the weights as host numpy
arrays) serve `from_pretrained`, `python -m cca_jax.generate`, `train.finetune` and
`train.evaluate` alike. The formats themselves live in `cca_jax.hf` (Hugging Face) and
`cca_jax.converted` (ours).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cca_jax.hf import (TOKENIZER_FILES, hf_to_params, llama_config_from_hf, load_hf_state_dict,
                        read_hf_config, stored_dtype)
from cca_jax.config import DEFAULT_CCA, CCAConfig, check_attention_kind, check_layer_indices
from cca_jax.converted import is_converted_dir, load_converted, read_converted_config
from cca_jax.llama import DTYPES, LlamaConfig, LlamaForCausalLM
from cca_jax.params import flat_by_name, key_path_name, name_mismatch


def _dtype_name(value, argument: str) -> str | None:
    """None, or a `LlamaConfig` dtype name from a name or a numpy/jax dtype."""
    if value is None:
        return None
    if not isinstance(value, str):
        try:
            value = np.dtype(value).name
        except TypeError:
            raise ValueError(f"{argument} must be one of {', '.join(DTYPES)} or None, got "
                             f"{value!r}") from None
    if value not in DTYPES:
        raise ValueError(f"{argument} must be one of {', '.join(DTYPES)} or None, got {value!r}")
    return value


def load_params_into(model: LlamaForCausalLM, params: Mapping) -> LlamaForCausalLM:
    """Replace every parameter of `model` (possibly abstract) by the arrays in `params`.

    `params` is a nested dict like `nnx.to_pure_dict(nnx.state(model, nnx.Param))`; layer
    keys may be ints or strings. Arrays are cast to the model's parameter dtype. Raises
    ValueError naming any missing, unexpected or misshapen parameter before anything changes.
    """
    state = nnx.state(model, nnx.Param)
    abstract = nnx.to_pure_dict(state)

    given = flat_by_name(params)
    wanted = flat_by_name(abstract)
    problems = name_mismatch(given, wanted)
    if problems:
        raise ValueError(f"stored parameters do not match the model config ({problems})")
    for name, leaf in wanted.items():
        shape = tuple(np.shape(given[name]))
        if shape != tuple(leaf.shape):
            raise ValueError(f"parameter {name!r} has shape {shape}, but the config expects "
                             f"{tuple(leaf.shape)}")

    def fill(path, leaf):
        return jnp.asarray(given[key_path_name(path)], dtype=leaf.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, abstract))
    nnx.update(model, state)
    return model


def read_config(path: str | os.PathLike) -> LlamaConfig:
    """The `LlamaConfig` stored in a converted or Hugging Face directory, without reading any
    weights (for checks that must come before the slow part)."""
    path = Path(path).expanduser()
    if is_converted_dir(path):
        return read_converted_config(path)
    return llama_config_from_hf(read_hf_config(path))


def read_params(path: str | os.PathLike) -> tuple[LlamaConfig, dict, str]:
    """(config, params, stored param dtype name) of a converted or Hugging Face directory.

    `params` is the nested parameter dict of host numpy arrays in their stored dtypes, with
    integer layer keys (`nnx.to_pure_dict`'s layout)."""
    path = Path(path).expanduser()
    if is_converted_dir(path):
        config, params = load_converted(path)
        return config, params, config.param_dtype
    config = llama_config_from_hf(read_hf_config(path))
    state_dict = load_hf_state_dict(path)
    stored = stored_dtype(state_dict.values())
    config = config.replace(param_dtype=stored)
    return config, hf_to_params(state_dict, config, keep_dtype=True), stored


def from_pretrained(path: str | os.PathLike, *, attention: str = "full",
                    cca: CCAConfig = DEFAULT_CCA, group_size: int | None = None,
                    window_size: int | None = None, dtype=None, param_dtype=None,
                    implementation: str | None = None,
                    full_attention_layers=None) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` with pretrained weights from a converted or HF directory.

    Args:
      path: directory from `python -m cca_jax.convert`, or a Hugging Face model directory.
      attention: "full" (causal softmax, as pretrained) or "cca".
      cca: CCA's g, w and op implementation (`CCAConfig`; default the paper's g = 16,
        w = 1024), used when attention="cca" (the stored directory's are not read).
      group_size, window_size, implementation: replace those fields of `cca`.
      full_attention_layers: layer indices that use full attention when attention="cca" (a
        hybrid model; `LlamaConfig.full_attention_layers`); () for none; None keeps the
        directory's (a train.finetune export of a hybrid model records them; a Hugging Face
        directory has none).
      dtype: compute dtype ("float32", "bfloat16", "float16" or a dtype); None keeps the
        stored config's (float32 for Hugging Face directories).
      param_dtype: parameter storage dtype; None keeps the dtype the weights are stored in.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{str(path)!r} is not a directory")
    dtype = _dtype_name(dtype, "dtype")
    param_dtype = _dtype_name(param_dtype, "param_dtype")
    # Validate the attention arguments before reading any weights.
    check_attention_kind(attention)
    if not isinstance(cca, CCAConfig):
        raise TypeError(f"cca must be a CCAConfig, got {type(cca).__name__}")
    cca = cca.updated(group_size=group_size, window_size=window_size,
                      implementation=implementation)
    changes = {}
    if full_attention_layers is not None:
        changes["full_attention_layers"] = check_layer_indices(
            full_attention_layers, read_config(path).num_hidden_layers)
    config, params, stored = read_params(path)
    config = config.replace(attention=attention, cca=cca, dtype=dtype or config.dtype,
                            param_dtype=param_dtype or stored, **changes)
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    return load_params_into(model, params)


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The Hugging Face tokenizer stored in `path` (local files only, never the hub)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(path)!r} does not exist or is not "
                                "a directory")
    tokenizer_files = [n for n in TOKENIZER_FILES
                       if n not in ("generation_config.json", "chat_template.jinja",
                                    "chat_template.json") and (path / n).is_file()]
    if not tokenizer_files:
        raise FileNotFoundError(f"no tokenizer files in {str(path)!r} (looked for "
                                "tokenizer.json, tokenizer.model, vocab.json + merges.txt)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
