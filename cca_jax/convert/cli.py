"""`python -m cca_jax.convert`: the command line of `cca_jax.convert` (parsing only; the
conversions and the check are library calls there). Exit codes: 0 done, 1 bad input or a
failed conversion, 2 a --check above its tolerance."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cca_jax.convert import (DEFAULT_CHECK_TOLERANCE, DTYPE_CHOICES, check, converted_to_hf,
                             hf_to_converted)


def add_check_arguments(parser: argparse.ArgumentParser, check_help: str) -> None:
    """--check (its help: `check_help`) and --check-tolerance, as `check` reads them."""
    parser.add_argument("--check", action="store_true", help=check_help)
    parser.add_argument("--check-tolerance", type=float, default=DEFAULT_CHECK_TOLERANCE,
                        metavar="TOL",
                        help="largest max |logit difference| --check accepts, relative to "
                             "max(1, max |logit|) (default: %(default)g); above it the exit "
                             "code is 2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cca_jax.convert",
        description=(
            "Convert a Hugging Face LLaMA or Qwen2 model directory (config.json plus "
            "model.safetensors, sharded safetensors or pytorch_model.bin) into a cca_jax "
            "directory (cca_config.json, orbax params/, tokenizer files), or back with "
            "--to-hf. Load the result with cca_jax.from_pretrained(OUT_DIR). The output "
            "directory is written atomically: an error, Ctrl-C or SIGTERM leaves no OUT_DIR "
            "and no temporary folder, and an existing OUT_DIR untouched; after a SIGKILL the "
            "next run removes the hidden temporary folder the killed run left."),
        epilog=("examples:\n"
                "  python -m cca_jax.convert ./SmolLM2-hf ./SmolLM2-cca --check\n"
                "  python -m cca_jax.convert --to-hf ./SmolLM2-cca ./SmolLM2-back"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SRC_DIR",
                        help="HF model directory (or, with --to-hf, a converted directory)")
    parser.add_argument("out_dir", metavar="OUT_DIR",
                        help="directory to create (must not exist unless --overwrite)")
    parser.add_argument("--to-hf", action="store_true",
                        help="convert a cca_jax directory SRC_DIR back to a Hugging Face "
                             "directory OUT_DIR (safetensors, config.json, tokenizer)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="parameter dtype to store; 'auto' keeps the dtype of the HF "
                             "weights, so a round trip is bit-identical (default: auto)")
    add_check_arguments(parser, "after converting, compare our float32 logits with "
                                "transformers' PyTorch model on a fixed sample and print the "
                                "max difference (needs torch and transformers)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR if it already exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    source, out_dir = Path(args.source).expanduser(), Path(args.out_dir).expanduser()
    if args.to_hf and (args.check or args.dtype != "auto"):
        parser.error("--check and --dtype apply only to HF -> cca_jax conversion, not --to-hf")
    try:
        if args.to_hf:
            converted_to_hf(source, out_dir, overwrite=args.overwrite)
            return 0
        hf_to_converted(source, out_dir, dtype=args.dtype, overwrite=args.overwrite)
        if args.check and not check(source, out_dir, args.check_tolerance)["ok"]:
            return 2
    except KeyError as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
