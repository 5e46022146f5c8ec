"""`python -m convert.parts`: move a large file in checksummed parts, and put it back together.

For machines reached through a narrow channel (the GPU machine of this project takes 64 MiB
per call): `split` cuts FILE into parts of at most `--part-size` bytes in DIR, with
`parts.json` recording each part's size and sha256 and the whole file's; `join` checks every
part against it, then writes the file (atomically, and checked again as a whole). A part that
is missing, short, or corrupted is named, and nothing is written.

    python -m convert.parts split FILE DIR [--part-size 44M]
    python -m convert.parts join DIR OUT_FILE [--overwrite]
    python -m convert.parts check DIR          # are all parts here and intact?
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from cca_jax.io import atomic_file, atomic_write_text

MANIFEST = "parts.json"
BLOCK = 1 << 20


def parse_size(text: str) -> int:
    """'44M' -> 44 MiB, '512K' -> 512 KiB, '1000' -> 1000 bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        size = int(float(raw[:-1]) * units[raw[-1]]) if raw and raw[-1] in units else int(raw)
    except (ValueError, KeyError):
        raise ValueError(f"--part-size must be a size such as 44M, 512K or 1000, got "
                         f"{text!r}") from None
    if size < 1:
        raise ValueError(f"--part-size must be >= 1 byte, got {text!r}")
    return size


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def split(file: str | os.PathLike, out_dir: str | os.PathLike, part_size: int) -> dict:
    """Cut `file` into `out_dir`/part-000, part-001, ... and write the manifest last."""
    file, out_dir = Path(file).expanduser(), Path(out_dir).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"FILE: {str(file)!r} is not a file")
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / MANIFEST).exists() or any(out_dir.glob("part-*")):
        raise FileExistsError(f"DIR: {str(out_dir)!r} already holds parts; use an empty one")
    parts, whole = [], hashlib.sha256()
    with open(file, "rb") as source:
        while True:
            chunk = source.read(part_size)
            if not chunk:
                break
            whole.update(chunk)
            name = f"part-{len(parts):03d}"
            with atomic_file(out_dir / name) as tmp:
                tmp.write_bytes(chunk)
            parts.append({"name": name, "bytes": len(chunk),
                          "sha256": hashlib.sha256(chunk).hexdigest()})
    manifest = {"file": file.name, "bytes": file.stat().st_size, "sha256": whole.hexdigest(),
                "parts": parts}
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def check(parts_dir: str | os.PathLike) -> dict:
    """The manifest, after checking that every part is present with its size and sha256."""
    parts_dir = Path(parts_dir).expanduser()
    try:
        manifest = json.loads((parts_dir / MANIFEST).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"DIR: no {MANIFEST} in {str(parts_dir)!r}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(parts_dir / MANIFEST)!r} is not valid JSON: {err}") from None
    problems = []
    for part in manifest["parts"]:
        path = parts_dir / part["name"]
        if not path.is_file():
            problems.append(f"{part['name']} is missing")
        elif path.stat().st_size != part["bytes"]:
            problems.append(f"{part['name']} has {path.stat().st_size} bytes, not {part['bytes']}")
        elif sha256_file(path) != part["sha256"]:
            problems.append(f"{part['name']} is corrupted (sha256 differs)")
    if problems:
        raise ValueError(f"{str(parts_dir)!r}: " + "; ".join(problems))
    return manifest


def join(parts_dir: str | os.PathLike, out_file: str | os.PathLike, *,
         overwrite: bool = False) -> Path:
    """Check the parts, concatenate them into `out_file` atomically, check the whole."""
    parts_dir, out_file = Path(parts_dir).expanduser(), Path(out_file).expanduser()
    if out_file.exists() and not overwrite:
        raise FileExistsError(f"OUT_FILE: {str(out_file)!r} exists; pass --overwrite")
    manifest = check(parts_dir)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_file) as tmp:
        with open(tmp, "wb") as out:
            for part in manifest["parts"]:
                with open(parts_dir / part["name"], "rb") as source:
                    for block in iter(lambda: source.read(BLOCK), b""):
                        out.write(block)
        if sha256_file(tmp) != manifest["sha256"]:
            raise ValueError(f"the joined file's sha256 differs from {manifest['sha256']}")
    return out_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert.parts",
        description="Split a file into checksummed parts, check them, join them back.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("split", help="FILE -> DIR/part-NNN + DIR/parts.json")
    p.add_argument("file", metavar="FILE")
    p.add_argument("out_dir", metavar="DIR")
    p.add_argument("--part-size", default="44M", help="largest part (default: %(default)s)")
    p = commands.add_parser("join", help="DIR -> OUT_FILE, every part checked")
    p.add_argument("parts_dir", metavar="DIR")
    p.add_argument("out_file", metavar="OUT_FILE")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_FILE")
    p = commands.add_parser("check", help="are all parts of DIR present and intact?")
    p.add_argument("parts_dir", metavar="DIR")
    args = parser.parse_args(argv)
    try:
        if args.command == "split":
            manifest = split(args.file, args.out_dir, parse_size(args.part_size))
            print(f"{manifest['file']}: {manifest['bytes']:,} bytes in "
                  f"{len(manifest['parts'])} parts in {args.out_dir}")
        elif args.command == "join":
            path = join(args.parts_dir, args.out_file, overwrite=args.overwrite)
            print(f"joined and checked: {path}")
        else:
            manifest = check(args.parts_dir)
            print(f"{len(manifest['parts'])} parts of {manifest['file']} present and intact")
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
