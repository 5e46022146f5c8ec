"""Hugging Face LLaMA / Qwen2 directories <-> cca_jax parameters and `LlamaConfig`.

The mapping is one rule, applied to the parameter tree of `cca_jax.llama.LlamaForCausalLM`:

    embed_tokens.embedding               <-> model.embed_tokens.weight
    layers[i].<module path>.kernel [in, out] <-> model.layers.i.<module path>.weight [out, in]
    layers[i].<module path>.bias / .weight   <-> model.layers.i.<module path>.bias / .weight
    norm.weight                          <-> model.norm.weight
    lm_head.kernel [D, V]                <-> lm_head.weight [V, D]   (absent when tied)

so converting is a rename plus a transpose of every matrix; no value changes, and a round
trip HF -> ours -> HF is bit-identical when the dtype is kept.

Reading accepts `model.safetensors`, sharded safetensors (`model.safetensors.index.json`) and
PyTorch pickles (`pytorch_model.bin`, also sharded); configs from transformers 4 (top-level
`rope_theta` / `rope_scaling`) and 5 (`rope_parameters`). torch is imported only to read
`.bin` files. Everything is checked before any array is touched for compute: a missing,
misshapen or unexpected tensor raises a ValueError that names it.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy; safetensors.numpy needs it)
import numpy as np

from cca_jax.llama import DTYPES, SUPPORTED_MODEL_TYPES, LlamaConfig
from cca_jax.io import atomic_directory, normalize_file_modes
from cca_jax.params import (flatten_params, list_names, name_mismatch, param_path_name,
                            unflatten_params)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
NUMPY_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                "float16": np.dtype(np.float16)}
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_FILE = "pytorch_model.bin"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
# Files that describe the tokenizer and generation defaults; copied along with the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3


# --------------------------------------------------------------------------- config


def _model_dir(hf_dir: str | os.PathLike) -> Path:
    path = Path(hf_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{str(path)!r} is not a directory; expected a Hugging Face "
                                 "model directory (config.json plus weight files)")
    if not os.access(path, os.R_OK | os.X_OK):
        raise PermissionError(f"model directory {str(path)!r} is not readable")
    return path


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    """The parsed `config.json` of a Hugging Face model directory.

    Raises FileNotFoundError / NotADirectoryError / PermissionError naming the path when the
    directory or its config.json is missing or unreadable, ValueError when it is not JSON.
    """
    path = _model_dir(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {str(path.parent)!r}; expected a Hugging "
                                "Face model directory (config.json plus weight files)")
    try:
        data = json.loads(path.read_text())
    except PermissionError as err:
        raise PermissionError(f"cannot read {str(path)!r}: {err.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def _rope_settings(hf_cfg: Mapping[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from a transformers 4 or 5 config."""
    params = hf_cfg.get("rope_parameters")
    if isinstance(params, Mapping) and params and all(
            isinstance(v, Mapping) or v is None for v in params.values()):
        # Nested per layer type (newer multi-attention models); LLaMA uses only full attention.
        params = params.get("full_attention")
    if not params:
        params = hf_cfg.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"rope_parameters / rope_scaling must be a JSON object, got {params!r}")
    params = dict(params)
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = hf_cfg.get("rope_theta", 10000.0)
    partial = params.pop("partial_rotary_factor", hf_cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor {partial} is not supported (only 1.0)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type == "llama3" and "original_max_position_embeddings" not in params:
        # transformers fills this in from the config, so do the same.
        params["original_max_position_embeddings"] = hf_cfg.get(
            "original_max_position_embeddings", hf_cfg.get("max_position_embeddings"))
    return float(theta), params


def llama_config_from_hf(hf_cfg: Mapping[str, Any], **overrides) -> LlamaConfig:
    """A `LlamaConfig` for a Hugging Face LLaMA or Qwen2 config dict (transformers 4 or 5).

    `overrides` replace fields afterwards (e.g. attention="cca", param_dtype="bfloat16").
    Raises ValueError naming the problem for unsupported model types or features.
    """
    model_type = hf_cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        found = "no model_type" if model_type is None else f"model_type {model_type!r}"
        raise ValueError(f"config.json has {found}, which is not supported; supported "
                         f"model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    missing = [key for key in required if hf_cfg.get(key) is None]
    if missing:
        raise ValueError(f"config.json lacks required field(s): {', '.join(missing)}")
    act = hf_cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act {act!r} is not supported (only 'silu')")
    if model_type == "qwen2":
        layer_types = hf_cfg.get("layer_types") or []
        if hf_cfg.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
            raise ValueError("Qwen2 sliding-window attention (use_sliding_window / "
                             "layer_types) is not supported; only full attention layers")
        qkv_bias, out_bias, mlp_bias = True, False, False
        default_max_positions = 32768
    else:
        qkv_bias = out_bias = bool(hf_cfg.get("attention_bias", False))
        mlp_bias = bool(hf_cfg.get("mlp_bias", False))
        default_max_positions = 2048
    theta, scaling = _rope_settings(hf_cfg)
    stored = hf_cfg.get("dtype", hf_cfg.get("torch_dtype"))
    eos = hf_cfg.get("eos_token_id")
    fields = dict(
        model_type=model_type,
        vocab_size=int(hf_cfg["vocab_size"]),
        hidden_size=int(hf_cfg["hidden_size"]),
        intermediate_size=int(hf_cfg["intermediate_size"]),
        num_hidden_layers=int(hf_cfg["num_hidden_layers"]),
        num_attention_heads=int(hf_cfg["num_attention_heads"]),
        num_key_value_heads=hf_cfg.get("num_key_value_heads"),
        head_dim=hf_cfg.get("head_dim"),
        rms_norm_eps=float(hf_cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(hf_cfg.get("max_position_embeddings")
                                    or default_max_positions),
        tie_word_embeddings=bool(hf_cfg.get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        attention_out_bias=out_bias,
        mlp_bias=mlp_bias,
        bos_token_id=hf_cfg.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        param_dtype=stored if stored in DTYPES else "float32",
    )
    fields.update(overrides)
    return LlamaConfig.from_dict(fields)


def hf_config_from_llama(config: LlamaConfig, *, dtype: str | None = None) -> dict:
    """A transformers-5 style config.json dict for `config` (weights stored in `dtype`)."""
    if config.model_type == "qwen2":
        if not config.attention_bias or config.attention_out_bias or config.mlp_bias:
            raise ValueError("a qwen2 model must have q/k/v biases and no o_proj or MLP bias "
                             f"(got attention_bias={config.attention_bias}, attention_out_bias="
                             f"{config.attention_out_bias}, mlp_bias={config.mlp_bias})")
    elif config.attention_bias != config.attention_out_bias:
        raise ValueError("Hugging Face LLaMA has one attention_bias flag for q/k/v and o_proj; "
                         f"attention_bias={config.attention_bias} and attention_out_bias="
                         f"{config.attention_out_bias} cannot be expressed")
    rope = {"rope_theta": float(config.rope_theta), "rope_type": "default"}
    rope.update({k: list(v) if isinstance(v, tuple) else v
                 for k, v in (config.rope_scaling or ())})
    eos = config.eos_token_id
    out = {
        "architectures": [ARCHITECTURES[config.model_type]],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rope,
        "rope_theta": float(config.rope_theta),  # for readers that predate rope_parameters
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": dtype or config.param_dtype,
    }
    if config.model_type == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None,
                   max_window_layers=config.num_hidden_layers,
                   layer_types=["full_attention"] * config.num_hidden_layers)
    else:
        out.update(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias,
                   pretraining_tp=1)
    return out


# --------------------------------------------------------------------------- weights I/O


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _unreadable(path: Path, err: BaseException) -> ValueError:
    return ValueError(f"cannot read the weights file {str(path)!r}: it is truncated or "
                      f"corrupted ({type(err).__name__}: {err}); download or save it again")


def _read_torch_file(path: Path) -> dict[str, np.ndarray]:
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as err:
        raise _unreadable(path, err) from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{str(path)!r} does not hold a state dict")
    return {name: _torch_to_numpy(t) for name, t in state.items() if isinstance(t, torch.Tensor)}


def _read_safetensors_file(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, ValueError) as err:
        raise _unreadable(path, err) from None


def _shard_files(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{str(index_path)!r} is not a valid shard index: {err}") from None
    files = [index_path.parent / name for name in dict.fromkeys(weight_map.values())]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise FileNotFoundError(f"shard(s) listed in {index_path.name} are missing: "
                                f"{', '.join(absent)}")
    return files


def weight_files(hf_dir: str | os.PathLike) -> list[Path]:
    """The weight files of an HF directory, in the order the loader prefers them."""
    path = _model_dir(hf_dir)
    for name in (SAFETENSORS_FILE, SAFETENSORS_INDEX, PYTORCH_FILE, PYTORCH_INDEX):
        candidate = path / name
        if candidate.is_file():
            return _shard_files(candidate) if name.endswith(".index.json") else [candidate]
    raise FileNotFoundError(
        f"no weights in {str(path)!r}: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, "
        f"{PYTORCH_FILE} or {PYTORCH_INDEX}")


def load_hf_state_dict(hf_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory as numpy arrays in their stored dtype (bf16 through
    ml_dtypes), from safetensors (single or sharded) or PyTorch `.bin` files."""
    state: dict[str, np.ndarray] = {}
    for file in weight_files(hf_dir):
        reader = _read_safetensors_file if file.suffix == ".safetensors" else _read_torch_file
        for name, array in reader(file).items():
            if name in state:
                raise ValueError(f"tensor {name!r} appears in more than one weight file")
            state[name] = array
    return state


# --------------------------------------------------------------------------- mapping


def _abstract_params(config: LlamaConfig) -> dict:
    """Our parameter tree for `config` as ShapeDtypeStructs (no memory, no random init)."""
    from flax import nnx

    from cca_jax.llama import LlamaForCausalLM

    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def hf_name(path: tuple) -> tuple[str, bool]:
    """(Hugging Face tensor name, whether the array is transposed) for one of our paths."""
    *modules, leaf = (str(key) for key in path)
    transpose = leaf == "kernel"
    leaf = "weight" if leaf in ("kernel", "embedding") else leaf
    prefix = "" if modules[:1] == ["lm_head"] else "model."
    return prefix + ".".join(modules + [leaf]), transpose


def _is_ignorable(name: str, config: LlamaConfig) -> bool:
    """Tensors an HF checkpoint may carry that we do not need."""
    return name.endswith("rotary_emb.inv_freq") or (
        config.tie_word_embeddings and name == "lm_head.weight")


def stored_dtype(arrays: Iterable[np.ndarray]) -> str:
    """The floating dtype holding most parameters, as a `LlamaConfig` dtype name."""
    counts: Counter = Counter()
    for array in arrays:
        dtype = np.dtype(array.dtype)
        if dtype.kind == "f" or dtype == NUMPY_DTYPES["bfloat16"]:
            counts[dtype.name] += int(np.prod(array.shape))
    if not counts:
        return "float32"
    name = counts.most_common(1)[0][0]
    return name if name in DTYPES else "float32"


def hf_to_params(state_dict: Mapping[str, np.ndarray], config: LlamaConfig, *,
                 keep_dtype: bool = False) -> dict:
    """Our nested pure parameter dict (numpy) from an HF state dict.

    Arrays are cast to `config.param_dtype`, or keep their own dtype with `keep_dtype=True`
    (float dtypes outside float32/bfloat16/float16 are then cast to `config.param_dtype`).
    Raises ValueError naming every missing, misshapen or unexpected tensor.
    """
    expected = flatten_params(_abstract_params(config))
    names = {path: hf_name(path) for path in expected}
    wanted = {name for name, _ in names.values()}
    missing = sorted(name for name in wanted if name not in state_dict)
    if missing:
        raise ValueError(f"checkpoint is missing tensor(s): {list_names(missing, 8)}")
    extra = sorted(name for name in state_dict if name not in wanted
                   and not _is_ignorable(name, config))
    if extra:
        raise ValueError(f"checkpoint has unexpected tensor(s) for this {config.model_type} "
                         f"config: {list_names(extra, 8)}")
    target = NUMPY_DTYPES[config.param_dtype]
    flat = {}
    for path, abstract in expected.items():
        name, transpose = names[path]
        array = np.asarray(state_dict[name])
        if transpose:
            array = array.T
        if tuple(array.shape) != tuple(abstract.shape):
            got = array.T.shape if transpose else array.shape
            want = tuple(abstract.shape)[::-1] if transpose else tuple(abstract.shape)
            raise ValueError(f"tensor {name!r} has shape {tuple(got)}, expected {want} for "
                             "this config")
        if not (keep_dtype and np.dtype(array.dtype) in NUMPY_DTYPES.values()):
            array = array.astype(target, copy=False)
        flat[path] = array
    return unflatten_params(flat)


def params_to_hf(params: Mapping, config: LlamaConfig) -> dict[str, np.ndarray]:
    """HF tensor name -> contiguous numpy array, each in the dtype it has in `params`.

    `params` may hold numpy or jax arrays, with int or str layer keys (as orbax returns).
    """
    expected = flatten_params(_abstract_params(config))
    by_name = {param_path_name(path): path for path in expected}
    given = {param_path_name(path): value for path, value in flatten_params(params).items()}
    problems = name_mismatch(given, by_name, limit=8)
    if problems:
        raise ValueError(f"parameters do not match the config: {problems}")
    out = {}
    for name, path in by_name.items():
        array = np.asarray(given[name])
        if tuple(array.shape) != tuple(expected[path].shape):
            raise ValueError(f"parameter {name!r} has shape {array.shape}, expected "
                             f"{tuple(expected[path].shape)}")
        hf, transpose = hf_name(path)
        out[hf] = np.ascontiguousarray(array.T if transpose else array)
    return out


# --------------------------------------------------------------------------- writing


def copy_tokenizer_files(src: str | os.PathLike | None, dst: Path) -> list[str]:
    """Copy the tokenizer / generation files present in `src` to `dst`; return their names."""
    if src is None:
        return []
    copied = []
    for name in TOKENIZER_FILES:
        file = Path(src).expanduser() / name
        if file.is_file():
            shutil.copy2(file, dst / name)
            copied.append(name)
    return copied


def _shards(tensors: Mapping[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    return shards


def write_hf_dir(out_dir: str | os.PathLike, params: Mapping, config: LlamaConfig,
                 tokenizer_src: str | os.PathLike | None = None, overwrite: bool = False, *,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write a Hugging Face directory (config.json, safetensors weights, tokenizer files).

    The directory appears atomically; FileExistsError before any work if it exists and
    `overwrite` is false. Weights larger than `max_shard_bytes` are split into shards with a
    `model.safetensors.index.json`, as transformers does. Returns the absolute path.
    """
    from safetensors.numpy import save_file

    target = Path(out_dir).expanduser().absolute()
    if target.exists() and not overwrite:
        raise FileExistsError(f"output directory {str(target)!r} already exists; pass "
                              "overwrite=True (--overwrite on the command line) to replace it")
    tensors = params_to_hf(params, config)
    hf_cfg = hf_config_from_llama(config, dtype=stored_dtype(tensors.values()))
    with atomic_directory(target, overwrite=overwrite) as tmp:
        shards = _shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], tmp / SAFETENSORS_FILE, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
                     "weight_map": weight_map}
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        copy_tokenizer_files(tokenizer_src, tmp)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        normalize_file_modes(tmp)   # safetensors' writer leaves its files 0600
    return target
