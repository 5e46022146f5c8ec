"""A GGUF file -> an ordinary Hugging Face model directory, through transformers' GGUF loader.

Shared by `convert.smollm2` (LLaMA) and `convert.qwen25_coder` (Qwen2). transformers dequantises
the file into a model of the architecture the GGUF metadata names; such a model refuses
``save_pretrained`` ("quantized with gguf and is not serializable"), so its weights move into a
fresh model of the same class built from the same config without ``quantization_config``, are
cast to the requested dtype and saved with the tokenizer:

    config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json

The callers own the output directory: `prepare_output` refuses what cannot be written before
any heavy work, and `write_hf_dir_from_gguf` fills a directory that `cca_jax.io.atomic_directory`
renames into place only when everything succeeded.

torch and transformers are imported lazily, so importing this module needs neither.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from cca_jax.io import check_writable, normalize_file_modes

DTYPES = ("bfloat16", "float32")


def torch_dtype(name: str):
    import torch

    table = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    if name not in table:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return table[name]


def prepare_output(out_dir: str | os.PathLike, *, dtype: str, overwrite: bool) -> Path:
    """The absolute output directory, after the checks that must come before any slow work:
    a known dtype, no existing ``out_dir`` unless ``overwrite``, a location that can be written
    (``FileExistsError`` / ``PermissionError`` / ``ValueError`` otherwise)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    target = Path(out_dir).expanduser().absolute()
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"output directory {str(target)!r} already exists; pass overwrite=True "
            "(--overwrite on the command line) to replace it")
    check_writable(target)   # a read-only location fails now, not after the slow load
    return target


def output_parser(prog: str, description: str, *,
                  overwrite_help: str) -> argparse.ArgumentParser:
    """A command-line parser with OUT_DIR, --overwrite and --dtype, as `prepare_output` takes
    them."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("out_dir", metavar="OUT_DIR",
                        help="directory to create (must not exist unless --overwrite is given)")
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                        help="dtype of the saved weights (default: %(default)s)")
    return parser


def align_special_tokens(tokenizer, config) -> None:
    """Make the tokenizer's BOS/EOS the ones the GGUF metadata gives the model config.

    transformers 5.17's GGUF tokenizer conversion declares EOS `<|im_start|>` (id 1) for the
    SmolLM2 file, whose metadata says EOS 2 (`<|im_end|>`); 5.25 gets it right. A wrong EOS
    silently changes what fine-tuning puts between documents and where generation stops.
    """
    for name in ("bos", "eos"):
        wanted = getattr(config, f"{name}_token_id", None)
        if isinstance(wanted, int) and getattr(tokenizer, f"{name}_token_id") != wanted:
            token = tokenizer.convert_ids_to_tokens(wanted)
            print(f"note: the tokenizer declared {name.upper()} "
                  f"{getattr(tokenizer, f'{name}_token')!r}; using {token!r} (id {wanted}) as "
                  "the GGUF metadata says", flush=True)
            setattr(tokenizer, f"{name}_token", token)


def write_hf_dir_from_gguf(out_dir: Path, gguf_file: str | os.PathLike, *, dtype: str,
                           expected_seconds: str = "") -> None:
    """Dequantise ``gguf_file`` with transformers and write the model (weights cast to
    ``dtype``) and its tokenizer into the existing directory ``out_dir``.

    The model class is the one transformers picks for the file's architecture (LLaMA, Qwen2,
    ...). Tied embeddings are saved without ``lm_head.weight``; a separate ``output.weight``
    becomes ``lm_head.weight``. Every file gets the ordinary mode of a new file.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file).absolute()
    folder, filename = gguf_file.parent, gguf_file.name
    target_dtype = torch_dtype(dtype)
    hint = f" (dequantising, {expected_seconds})" if expected_seconds else " (dequantising)"
    print(f"loading GGUF {gguf_file}{hint} ...", flush=True)
    t0 = time.perf_counter()
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename,
                                                      dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    align_special_tokens(tokenizer, gguf_model.config)
    print(f"loaded in {time.perf_counter() - t0:.1f} s", flush=True)

    model_class, config_class = type(gguf_model), type(gguf_model.config)
    config_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "dtype", "torch_dtype"):
        config_dict.pop(key, None)
    config = config_class.from_dict(config_dict)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = target_dtype

    print(f"copying weights into a fresh {model_class.__name__} ({dtype}) ...", flush=True)
    model = model_class(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head.weight may be absent from the source state dict because it is tied.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing}, unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(target_dtype).eval()
    model.config.dtype = target_dtype
    if getattr(gguf_model, "generation_config", None) is not None:
        model.generation_config = gguf_model.generation_config
    del gguf_model

    print(f"writing model and tokenizer to {out_dir} ...", flush=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

    saved = json.loads((out_dir / "config.json").read_text())
    if "quantization_config" in saved:
        raise RuntimeError("saved config.json unexpectedly contains quantization_config")
    if saved.get("dtype", saved.get("torch_dtype")) != dtype:
        saved["dtype"] = dtype
        (out_dir / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    if not (out_dir / "model.safetensors").is_file():
        raise RuntimeError("save_pretrained did not write model.safetensors")
    normalize_file_modes(out_dir)   # the safetensors writer leaves model.safetensors 0600
