"""Atomic outputs: a run that is interrupted never leaves a half-written result.

Everything is written into a hidden temporary sibling of the target; only when the writer
finishes without an exception is the temporary renamed onto the target (a directory with
`atomic_directory`, a single file with `atomic_file`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `out_dir` when the block succeeds.

    Raises FileExistsError before anything is written if `out_dir` exists and `overwrite`
    is false. On any exception the temporary directory is removed and `out_dir` is untouched.
    """
    target = Path(out_dir).expanduser().absolute()
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"output directory {str(target)!r} already exists; pass overwrite=True "
            "(--overwrite on the command line) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the result normal permissions
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "previous")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path (same suffix, so writers that infer the format from it
    work) that replaces `path` when the block succeeds; removed on any exception."""
    target = Path(path)
    tmp = target.with_name(f".{target.stem}.tmp{target.suffix}")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
