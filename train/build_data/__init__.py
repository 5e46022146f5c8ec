"""Offline long-context training data, mixed by token share: `run(BuildDataJob(...))` (or
`build`), and on the command line `python -m train.build_data` (`train/build_data/cli.py`).

Builds `--tokens` tokens of training sequences of `--seq-len + 1` tokens each (the inputs and
the shifted targets of one `--seq-len` training sequence), from three kinds of source:

- code: long `.py` files of this Python's standard library and site-packages
  (`train.sources`); the files of one package are concatenated in path order, so a sequence
  holds related modules (imports, class names and helpers used far from where they are
  defined). Whole packages are held out: `train.sources.HELDOUT_CODE_PACKAGES`.
- prose: the Shakespeare plays and the KJV books that no evaluation reads, plus
  `--prose-files`; documents are concatenated and cut, so a sequence is mostly one long work.
- retrieval: synthetic documents (`train.synthetic`: ledgers, code traces, numbered lines),
  one per sequence, whose questions at the end ask for facts spread over the whole context.

Every sequence holds one kind; the number of sequences of each kind follows `--mix`, and their
order is a permutation drawn from `--seed`, as is everything else: the same command on the
same installation builds the same bytes. Output (written atomically) in `--out`:

    train.npy        int32 [N, seq_len + 1]  training sequences
    heldout.npy      int32 [M, seq_len + 1]  sequences of held-out code and prose (for the
                                             fine-tune's held-out perplexity)
    manifest.json    the command, the tokenizer, the mix asked and built, and every source
                     file with its split and the tokens taken from it

`python -m train.finetune --data OUT` reads such a directory directly (no re-tokenisation).

    python -m train.build_data --tokenizer models/smollm2 --out data/long8k \\
        --tokens 82M --seq-len 8192 [--mix code=0.6,prose=0.1,retrieval=0.3] [--seed 0]
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from train import sources as sources_lib
from train import synthetic

KINDS = ("code", "prose", "retrieval")
DEFAULT_MIX = {"code": 0.6, "prose": 0.1, "retrieval": 0.3}
DEFAULT_TOKENS = "82M"
MANIFEST, TRAIN_FILE, HELDOUT_FILE = "manifest.json", "train.npy", "heldout.npy"
FORMAT = "cca-jax-token-sequences-1"
MAX_LINE_CHARS = 160      # longer lines (data tables, minified code) make poor filler
_BATCH_FILES = 64          # files tokenised per call (the fast tokenizer runs them in parallel)


class UsageError(ValueError):
    """A bad argument, found before any work."""


def parse_count(text: str) -> int:
    """'82M' -> 82_000_000, '500K' -> 500_000, '1234' -> 1234."""
    units = {"K": 1_000, "M": 1_000_000, "G": 1_000_000_000}
    raw = text.strip().upper()
    try:
        value = float(raw[:-1]) * units[raw[-1]] if raw and raw[-1] in units else float(raw)
    except ValueError:
        raise UsageError(f"--tokens must be a count such as 82M, 500K or 1234, got {text!r}")
    if not math.isfinite(value) or value < 1:
        raise UsageError(f"--tokens must be >= 1, got {text!r}")
    return int(value)


def parse_mix(text: str) -> dict[str, float]:
    """'code=0.6,prose=0.1,retrieval=0.3' -> shares summing to 1 (every kind named)."""
    mix = {}
    for part in text.split(","):
        kind, _, share = part.partition("=")
        kind = kind.strip()
        if kind not in KINDS:
            raise UsageError(f"--mix: unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
        try:
            mix[kind] = float(share)
        except ValueError:
            raise UsageError(f"--mix: {part!r} is not KIND=SHARE") from None
    return check_mix(mix)


def check_mix(mix: dict[str, float]) -> dict[str, float]:
    """The share of every kind (0 for those not named); UsageError unless the kinds are known,
    the shares finite and >= 0, and their sum 1."""
    for kind, share in mix.items():
        if kind not in KINDS:
            raise UsageError(f"--mix: unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
        if not (math.isfinite(share) and share >= 0):
            raise UsageError(f"--mix: the share of {kind} must be >= 0, got {share!r}")
    total = sum(mix.values())
    if total <= 0 or abs(total - 1) > 1e-6:
        written = ",".join(f"{kind}={share:g}" for kind, share in mix.items())
        raise UsageError(f"--mix: the shares must sum to 1, got {total:g} ({written})")
    return {kind: float(mix.get(kind, 0.0)) for kind in KINDS}


def sequence_counts(total: int, mix: dict[str, float]) -> dict[str, int]:
    """Sequences per kind: largest remainders, so the counts sum to `total`."""
    exact = {k: total * mix[k] for k in KINDS}
    counts = {k: int(math.floor(v)) for k, v in exact.items()}
    for k in sorted(KINDS, key=lambda k: exact[k] - counts[k], reverse=True):
        if sum(counts.values()) == total:
            break
        counts[k] += 1
    return counts


TOKENIZER_PROBE = "def tokenize(text):\n    return [t for t in text.split()]  # The quick brown fox."


def tokenizer_identity(tokenizer_dir: Path, tokenizer) -> dict:
    """What a fine-tune checks before using the data: the same vocabulary (every token and
    id, hashed), the same EOS, and the same ids for a probe text. File bytes are not compared:
    two transformers versions serialise one tokenizer differently."""
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return {"path": str(tokenizer_dir), "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "vocabulary_sha256": hashlib.sha256(vocabulary.encode("utf-8")).hexdigest(),
            "probe_ids": list(tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"])}


class _Stream:
    """Token chunks of `size` cut from documents tokenised on demand, epoch after epoch.

    documents: SourceFile list in the order of the first epoch; later epochs reshuffle it.
    Records per file the tokens it contributed (first epoch) in `used`.
    """

    def __init__(self, documents, tokenizer, eos: int, size: int, rng: np.random.Generator,
                 reshuffle, name: str):
        self.documents, self.tokenizer, self.eos, self.size = documents, tokenizer, eos, size
        self.rng, self.reshuffle, self.name = rng, reshuffle, name
        self.used: dict[str, int] = {}
        self.skipped: list[str] = []
        self.epochs = 0
        self._hashes: set[str] = set()
        self._accepted: set[str] = set()
        self._buffer: list[int] = []
        self._iterator = self._tokens()

    def _texts(self, order) -> Iterator[tuple[object, str]]:
        """Readable, distinct documents; after the first epoch, the ones it accepted."""
        for source in order:
            if self.epochs > 1 and source.path not in self._accepted:
                continue
            text = sources_lib.read_text_or_none(source)
            if self.epochs == 1:
                digest = hashlib.sha1(text.encode("utf-8")).hexdigest() if text else None
                if text is None or digest in self._hashes:
                    self.skipped.append(source.path)
                    continue
                self._hashes.add(digest)
                self._accepted.add(source.path)
            if text is not None:
                yield source, text

    def _tokens(self) -> Iterator[list[int]]:
        order = list(self.documents)
        while True:
            self.epochs += 1
            if self.epochs > 1:
                order = self.reshuffle(order, self.rng)
            produced = False
            batch: list[tuple[object, str]] = []
            for item in self._texts(order):
                batch.append(item)
                if len(batch) == _BATCH_FILES:
                    yield from self._encode(batch)
                    produced, batch = True, []
            if batch:
                yield from self._encode(batch)
                produced = True
            if not produced:
                raise UsageError(f"no usable {self.name} text was found")

    def _encode(self, batch) -> Iterator[list[int]]:
        ids = self.tokenizer([t for _, t in batch], add_special_tokens=False)["input_ids"]
        for (source, _), tokens in zip(batch, ids):
            if self.epochs == 1:
                self.used[source.path] = len(tokens) + 1
            yield list(tokens) + [self.eos]

    def chunk(self) -> np.ndarray:
        while len(self._buffer) < self.size:
            self._buffer.extend(next(self._iterator))
        out, self._buffer = self._buffer[:self.size], self._buffer[self.size:]
        return np.asarray(out, np.int32)


def _shuffle_documents(order, rng):
    return [order[i] for i in rng.permutation(len(order))]


def _shuffle_packages(files, rng):
    """Files grouped by package (path order inside), packages in a random order."""
    packages: dict[str, list] = {}
    for f in files:
        packages.setdefault(f.group, []).append(f)
    names = sorted(packages)
    return [f for i in rng.permutation(len(names)) for f in sorted(packages[names[i]],
                                                                   key=lambda f: f.path)]


def build(tokenizer_dir: str | os.PathLike, out: str | os.PathLike, *, tokens: int, seq_len: int,
          mix: dict[str, float] = DEFAULT_MIX, seed: int = 0, heldout_sequences: int = 16,
          prose_files: Sequence[str] = (), code_files=None, prose_documents=None,
          workers: int = 1, overwrite: bool = False, progress: bool = True,
          command: str = "") -> dict:
    """Build the data set (see the module docstring) and return its manifest.

    code_files / prose_documents: the candidate SourceFiles (default: `train.sources`), so a
    test can give a small set. workers: processes that build the synthetic documents (1: in
    this process); the result does not depend on it.
    """
    from cca_jax.loading import load_tokenizer
    from cca_jax.io import atomic_directory

    start = time.perf_counter()
    tokenizer_dir = Path(tokenizer_dir).expanduser()
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise UsageError(f"--out {str(out)!r} already exists; pass --overwrite to replace it")
    tokenizer = load_tokenizer(tokenizer_dir)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UsageError("the tokenizer defines no EOS token to put between documents")
    size = seq_len + 1
    total = max(1, math.ceil(tokens / seq_len))
    counts = sequence_counts(total, mix)
    rng = np.random.default_rng([seed, 0])
    code = sources_lib.code_files() if code_files is None else list(code_files)
    prose = (sources_lib.prose_documents(prose_files) if prose_documents is None
             else list(prose_documents))
    splits = {kind: {split: [f for f in files if f.split == split]
                     for split in ("train", "heldout")}
              for kind, files in (("code", code), ("prose", prose))}
    for kind in ("code", "prose"):
        if (counts[kind] or counts["retrieval"]) and not splits[kind]["train"]:
            raise UsageError(f"no {kind} files to train on")

    def log(message):
        if progress:
            print(f"[{time.perf_counter() - start:6.1f} s] {message}", file=sys.stderr,
                  flush=True)

    log(f"{total} sequences of {size} tokens: " + ", ".join(f"{k} {counts[k]}" for k in KINDS)
        + f"; {len(splits['code']['train'])} code files, {len(splits['prose']['train'])} "
          "prose documents to draw from")
    streams = {
        "code": _Stream(_shuffle_packages(splits["code"]["train"], rng), tokenizer, eos, size,
                        rng, _shuffle_packages, "code"),
        "prose": _Stream(_shuffle_documents(splits["prose"]["train"], rng), tokenizer, eos, size,
                         rng, _shuffle_documents, "prose"),
    }
    train = np.zeros((total, size), np.int32)
    kinds = np.repeat(np.arange(len(KINDS)), [counts[k] for k in KINDS])
    kinds = kinds[rng.permutation(total)]
    retrieval_rows = [int(r) for r in np.flatnonzero(kinds == KINDS.index("retrieval"))]
    # Synthetic documents are pure Python work: built by `workers` processes while this one
    # tokenises code and prose (the tokenizer itself runs on every core).
    pending = _start_retrieval(retrieval_rows, tokenizer_dir, splits, seed, size, workers)
    for row, kind in enumerate(kinds):
        name = KINDS[kind]
        if name != "retrieval":
            train[row] = streams[name].chunk()
        if progress and (row + 1) % max(1, total // 10) == 0:
            log(f"{row + 1}/{total} code and prose sequences placed")
    templates: dict[str, int] = {t: 0 for t in synthetic.TEMPLATES}
    depths = []
    for rows, arrays, names, doc_depths in pending():
        train[rows] = arrays
        for name in names:
            templates[name] += 1
        depths += doc_depths
    log(f"{len(retrieval_rows)} retrieval documents built")

    held = []
    for kind in ("code", "prose"):
        files = splits[kind]["heldout"]
        want = heldout_sequences // 2 if kind == "code" else heldout_sequences - len(held)
        if files and want:
            stream = _Stream(files, tokenizer, eos, size, np.random.default_rng([seed, 1]),
                             _shuffle_documents, f"held-out {kind}")
            held += [stream.chunk() for _ in range(want)]
    heldout = np.stack(held) if held else np.zeros((0, size), np.int32)

    built_tokens = {k: int(counts[k] * size) for k in KINDS}
    manifest = {
        "format": FORMAT,
        "command": command,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "seed": seed, "seq_len": seq_len, "sequence_tokens": size,
        "tokenizer": tokenizer_identity(tokenizer_dir, tokenizer),
        "mix_requested": mix,
        "sequences": {k: counts[k] for k in KINDS},
        "tokens": built_tokens,
        "mix_built": {k: built_tokens[k] / (total * size) for k in KINDS},
        "train_sequences": total, "heldout_sequences": int(len(heldout)),
        "epochs": {k: streams[k].epochs for k in ("code", "prose")},
        "retrieval": {"templates": templates, "questions_per_document": synthetic.QUESTIONS,
                      "answer_depth_quantiles": [float(q) for q in np.quantile(
                          depths, [0, 0.25, 0.5, 0.75, 1])] if depths else []},
        "heldout": {"code_packages": list(sources_lib.HELDOUT_CODE_PACKAGES),
                    "note": "held-out plays, KJV evaluation books and the mdqa filler book "
                            "are listed under sources with split 'heldout'"},
        "sources": [{"path": f.path, "kind": f.kind, "group": f.group, "split": f.split,
                     "name": f.name,
                     "train_tokens": streams[f.kind].used.get(f.path, 0)
                     if f.split == "train" else 0,
                     "skipped": f.path in streams[f.kind].skipped}
                    for f in code + prose],
        "seconds": None,
    }
    manifest["seconds"] = round(time.perf_counter() - start, 1)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        np.save(tmp / TRAIN_FILE, train)
        np.save(tmp / HELDOUT_FILE, heldout)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"wrote {out} ({train.nbytes / 1e6:.0f} MB)")
    return manifest


class _RetrievalSource:
    """Synthetic documents whose filler lines come from random training documents."""

    def __init__(self, tokenizer, splits):
        self._encode = lambda texts: tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        self._pad = self._encode(["Notes follow.\n"])[0]
        self._documents = {"trace": splits["code"]["train"], "lines": splits["prose"]["train"]}

    def _lines(self, template: str, rng: np.random.Generator, wanted: int = 2000) -> list[str]:
        """Non-blank lines of random documents of the template's kind, at least `wanted`."""
        documents, lines = self._documents[template], []
        for _ in range(64):
            text = sources_lib.read_text_or_none(documents[int(rng.integers(len(documents)))])
            lines += [line for line in (text or "").splitlines()
                      if line.strip() and len(line) <= MAX_LINE_CHARS]
            if len(lines) >= wanted:
                break
        return lines

    def document(self, row: int, seed: int, size: int):
        """The synthetic document of training row `row`: a pure function of (seed, row)."""
        template = synthetic.TEMPLATES[row % len(synthetic.TEMPLATES)]
        for attempt in range(3):    # a short document can draw filler with no room for a fact
            rng = np.random.default_rng([seed, 2, row, attempt])
            lines = self._lines(template, rng) if template in self._documents else []
            try:
                return synthetic.make_document(template, self._encode, size, rng,
                                               pad=self._pad, code_lines=lines, sentences=lines)
            except ValueError:
                if attempt == 2:
                    raise


_WORKER: dict = {}


def _worker_init(tokenizer_dir: str, splits) -> None:
    # transformers directly: cca_jax.loading would import jax into every worker.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    _WORKER["source"] = _RetrievalSource(tokenizer, splits)


def _worker_rows(rows: list[int], seed: int, size: int):
    docs = [_WORKER["source"].document(row, seed, size) for row in rows]
    return (rows, np.stack([d.ids for d in docs]), [d.template for d in docs],
            [f.depth for d in docs for f in d.asked])


def _start_retrieval(rows: list[int], tokenizer_dir: Path, splits, seed: int, size: int,
                     workers: int):
    """Start building the documents of `rows`; returns a function that yields the results
    (rows, arrays [n, size], template names, answer depths) batch by batch."""
    batches = [rows[i:i + 32] for i in range(0, len(rows), 32)]
    if workers <= 1 or not batches:
        def inline():
            _worker_init(str(tokenizer_dir), splits)
            for batch in batches:
                yield _worker_rows(batch, seed, size)
        return inline
    import concurrent.futures
    import multiprocessing

    # spawn, not fork: the parent's tokenizer has threads of its own by then.
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_init, initargs=(str(tokenizer_dir), splits))
    futures = [pool.submit(_worker_rows, batch, seed, size) for batch in batches]

    def results():
        try:
            for future in futures:
                yield future.result()
        finally:
            pool.shutdown(cancel_futures=True)
    return results


def load_built(path: str | os.PathLike) -> tuple[dict, np.ndarray, np.ndarray]:
    """(manifest, train [N, seq_len + 1], heldout [M, seq_len + 1]) of a built directory."""
    path = Path(path).expanduser()
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(manifest_path)!r} is not a readable manifest: {err}") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a train.build_data directory (format "
                         f"{manifest.get('format')!r}, expected {FORMAT!r})")
    train = np.load(path / TRAIN_FILE, mmap_mode="r")
    heldout = np.load(path / HELDOUT_FILE, mmap_mode="r")
    size = manifest["sequence_tokens"]
    for name, array in ((TRAIN_FILE, train), (HELDOUT_FILE, heldout)):
        if array.ndim != 2 or array.shape[1] != size or array.dtype != np.int32:
            raise ValueError(f"{str(path / name)!r} is {array.dtype} {array.shape}, expected "
                             f"int32 [N, {size}]")
    return manifest, train, heldout


def is_built_dir(path: str | os.PathLike) -> bool:
    path = Path(path).expanduser()
    return (path / MANIFEST).is_file() and (path / TRAIN_FILE).is_file()


# ----------------------------------------------------------------------------- the job


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuildDataJob:
    """One data set to build (see the module docstring). Each field is the command-line flag of
    the same name (`seq_len` is --seq-len; `tokens` is --tokens as a number, `mix` --mix as
    {kind: share}); the command line takes its defaults from here. Checked when made
    (`UsageError` naming the flag)."""

    tokenizer: str | os.PathLike
    out: str | os.PathLike
    tokens: int = dataclasses.field(default_factory=lambda: parse_count(DEFAULT_TOKENS))
    seq_len: int = 8192
    mix: dict[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_MIX))
    seed: int = 0
    heldout_sequences: int = 16
    prose_files: tuple[str, ...] = ()
    workers: int = max(1, (os.cpu_count() or 2) - 1)
    overwrite: bool = False
    no_progress: bool = False
    command: str = ""       # the command line, recorded in the manifest

    def __post_init__(self):
        object.__setattr__(self, "mix", check_mix(dict(self.mix)))
        object.__setattr__(self, "prose_files", tuple(str(f) for f in self.prose_files))
        if not self.tokens >= 1:
            raise UsageError(f"--tokens must be >= 1, got {self.tokens!r}")
        if self.seq_len < 2:
            raise UsageError(f"--seq-len must be >= 2, got {self.seq_len}")
        if self.workers < 1:
            raise UsageError(f"--workers must be >= 1, got {self.workers}")
        if self.heldout_sequences < 0:
            raise UsageError(f"--heldout-sequences must be >= 0, got {self.heldout_sequences}")


def run(job: BuildDataJob) -> dict:
    """Build the job's data set; return its manifest. UsageError (before any work) if the
    tokenizer directory is not one or --out exists without --overwrite."""
    if not Path(job.tokenizer).expanduser().is_dir():
        raise UsageError(f"--tokenizer: {str(job.tokenizer)!r} is not a directory")
    return build(job.tokenizer, job.out, tokens=int(job.tokens), seq_len=job.seq_len,
                 mix=job.mix, seed=job.seed, heldout_sequences=job.heldout_sequences,
                 prose_files=job.prose_files, workers=job.workers, overwrite=job.overwrite,
                 progress=not job.no_progress,
                 command=job.command or f"train.build_data.run({job!r})")
