"""Synthetic retrieval documents for training: facts spread over a long context, questions
about them at its end, so the loss on the answers rewards looking back exactly.

Three templates, none shared with an evaluation task (`train.eval_tasks`: the pass key in
grass-and-sky filler, the "code of NAME" facts in documents):

- `ledger`: lines "tag QX-4821-LM => 739215" (values of 3 to 8 digits), then "Checks:" and
  some of the tags again with their values;
- `trace`: real code lines with assignments `_cfg_river_17 = 48213` slipped in between,
  then `assert _cfg_river_17 == 48213` lines;
- `lines`: numbered prose lines "[00412] ...", then "recall [00412] ..." with the line.

Each document is exactly `length` tokens. Its questions ask about facts drawn uniformly over
the body, so the answers lie at depths from 0 to 100%. Pieces are tokenised separately and
concatenated, as in `train.eval_tasks`, so every fact's token span is known.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

TEMPLATES = ("ledger", "trace", "lines")
QUESTIONS = 8
_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"
_WORDS = ("river", "stone", "amber", "cedar", "falcon", "harbor", "meadow", "copper", "lantern",
          "orchid", "summit", "willow", "quartz", "tundra", "velvet", "saffron", "pepper",
          "canyon", "marble", "thistle", "beacon", "glacier", "juniper", "nectar")

EncodeBatch = Callable[[list[str]], list[list[int]]]
# Units are generated as text, this many characters per wanted token (then more if short).
_CHARS_PER_TOKEN = 4


@dataclasses.dataclass(frozen=True)
class Fact:
    key: str
    value: str
    start: int        # token offset of the fact's line in the document
    depth: float      # offset of the fact in the body / body length, in [0, 1]


@dataclasses.dataclass(frozen=True)
class SyntheticDocument:
    template: str
    ids: np.ndarray                 # int32 [length]
    asked: tuple[Fact, ...]         # the facts the questions at the end ask about, in order


def _value(rng: np.random.Generator) -> str:
    digits = int(rng.integers(3, 9))
    return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))


def _tag(rng: np.random.Generator) -> str:
    letters = rng.choice(list(_LETTERS), size=4)
    return f"{letters[0]}{letters[1]}-{int(rng.integers(1000, 10000))}-{letters[2]}{letters[3]}"


def _fill_to(tokens: list[int], pad: Sequence[int], size: int) -> list[int]:
    """`tokens` with the last `size - len(tokens)` tokens of the pad repeated in front (so the
    padding ends where the pad text ends, e.g. at its newline)."""
    gap = size - len(tokens)
    if gap <= 0:
        return tokens[:size]
    if not pad:
        raise ValueError("the padding text tokenises to nothing")
    return [pad[(i - gap) % len(pad)] for i in range(gap)] + tokens


class _Template:
    """A header, body units (text, fact or None) generated on demand, a question format."""

    name = ""
    header = ""

    def question(self, key: str, value: str) -> str:
        raise NotImplementedError

    def units(self, rng: np.random.Generator, chars: int) -> list[tuple[str, tuple | None]]:
        raise NotImplementedError

    def document(self, encode: EncodeBatch, length: int, rng: np.random.Generator,
                 pad: Sequence[int]) -> SyntheticDocument:
        """Header, as many body units as fit, a padding note, then up to QUESTIONS questions."""
        head = encode([self.header])[0]
        texts, facts_of, tokens = [], [], []
        while sum(map(len, tokens)) < length:
            units = self.units(rng, (length - sum(map(len, tokens))) * _CHARS_PER_TOKEN + 200)
            texts += [t for t, _ in units]
            facts_of += [f for _, f in units]
            tokens += encode([t for t, _ in units])
        with_fact = [i for i, f in enumerate(facts_of) if f is not None]
        longest = max(len(tokens[i]) for i in with_fact) + 4   # "recall"/"assert" prefixes
        newline = encode(["\n"])[0]
        # Room for the questions: all of them at their longest, or at least one (a third of
        # a short document).
        reserve = min(QUESTIONS * longest, max(longest, length // 3)) + len(newline)
        budget = length - len(head) - reserve
        if budget <= 0:
            raise ValueError(f"{self.name}: a document of {length} tokens is too short")
        taken, used = [], 0
        for i, unit in enumerate(tokens):
            if used + len(unit) > budget:
                break
            taken.append((used, i))
            used += len(unit)
        facts = [(offset, facts_of[i]) for offset, i in taken if facts_of[i] is not None]
        if not facts:
            raise ValueError(f"{self.name}: no fact fits in a document of {length} tokens")
        # Short documents ask about half their facts at most.
        asked = min(QUESTIONS, max(1, len(facts) // 2))
        picks = [int(i) for i in rng.choice(len(facts), size=asked, replace=False)]
        questions = encode([self.question(*facts[i][1]) for i in picks])
        while sum(map(len, questions)) + len(newline) > length - len(head) - used:
            picks, questions = picks[:-1], questions[:-1]     # never below one: see reserve
        tail = list(newline) + [t for q in questions for t in q]
        # The questions are known now: more body units where the reserve was not needed.
        for i in range(len(taken), len(tokens)):
            if used + len(tokens[i]) > length - len(head) - len(tail):
                break
            taken.append((used, i))
            used += len(tokens[i])
        body = [t for _, i in taken for t in tokens[i]]
        body = _fill_to(body, pad, length - len(head) - len(tail))
        shift = len(body) - used      # padding tokens in front of the body
        ids = list(head) + body + tail
        if len(ids) != length:
            raise AssertionError(f"{self.name}: built {len(ids)} tokens, wanted {length}")
        asked = tuple(Fact(key=facts[i][1][0], value=facts[i][1][1],
                           start=len(head) + shift + facts[i][0],
                           depth=facts[i][0] / max(1, used)) for i in picks)
        return SyntheticDocument(self.name, np.asarray(ids, np.int32), asked)


class _Ledger(_Template):
    name = "ledger"
    header = "Ledger of tags and counts. Every tag appears once.\n"

    def __init__(self):
        self.seen: set[str] = set()

    def question(self, key, value):
        return f"tag {key} => {value}\n"

    def units(self, rng, chars):
        out, size = [], 0
        while size < chars:
            key = _tag(rng)
            if key in self.seen:
                continue
            self.seen.add(key)
            text = self.question(key, _value(rng))
            out.append((text, (key, text.split(" => ")[1].strip())))
            size += len(text)
        return out


class _Trace(_Template):
    """Code lines (cycled from a random start) with an assignment after about every 12 (never
    more than 16 apart)."""

    name = "trace"
    header = "# configuration trace\n"

    def __init__(self, code_lines: Sequence[str], rng: np.random.Generator):
        if not code_lines:
            raise ValueError("the trace template needs code lines")
        self.code_lines, self.next = code_lines, int(rng.integers(len(code_lines)))
        self.names: set[str] = set()
        self.since = int(rng.integers(8, 17))   # code lines since the last assignment

    def question(self, key, value):
        return f"assert {key} == {value}\n"

    def units(self, rng, chars):
        out, size = [], 0
        while size < chars:
            self.since += 1
            if rng.random() < 1 / 12 or self.since > 16:
                name = f"_cfg_{_WORDS[int(rng.integers(len(_WORDS)))]}_{int(rng.integers(100))}"
                if name in self.names:
                    continue
                self.names.add(name)
                self.since = 0
                value = _value(rng)
                out.append((f"{name} = {value}\n", (name, value)))
            else:
                out.append((self.code_lines[self.next % len(self.code_lines)] + "\n", None))
                self.next += 1
            size += len(out[-1][0])
        return out


class _Lines(_Template):
    """Numbered prose lines (consecutive sentences from a random start)."""

    name = "lines"
    header = "Numbered lines; each number labels one line.\n"

    def __init__(self, sentences: Sequence[str], rng: np.random.Generator):
        if not sentences:
            raise ValueError("the lines template needs sentences")
        self.sentences, self.next = sentences, int(rng.integers(len(sentences)))
        self.number = int(rng.integers(0, 50000))

    def question(self, key, value):
        return f"recall {key} {value}\n"

    def units(self, rng, chars):
        out, size = [], 0
        while size < chars:
            key = f"[{self.number:05d}]"
            value = " ".join(self.sentences[self.next % len(self.sentences)].split())
            out.append((f"{key} {value}\n", (key, value)))
            self.number, self.next = self.number + 1, self.next + 1
            size += len(out[-1][0])
        return out


def make_document(template: str, encode: EncodeBatch, length: int, rng: np.random.Generator,
                  *, pad: Sequence[int], code_lines: Sequence[str] = (),
                  sentences: Sequence[str] = ()) -> SyntheticDocument:
    """One document of the given template (see the module docstring), `length` tokens.

    encode: texts -> token lists (no special tokens). pad: tokens that fill the gap of less
    than one line between the body and the questions.
    """
    if template == "ledger":
        maker = _Ledger()
    elif template == "trace":
        maker = _Trace(code_lines, rng)
    elif template == "lines":
        maker = _Lines(sentences, rng)
    else:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    return maker.document(encode, length, rng, pad)
