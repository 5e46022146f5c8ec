"""`python -m train.build_data`: held-out sources never reach training, synthetic answers are
right, the mix holds, the result is deterministic, and train.finetune reads it."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from train import build_data, sources, synthetic
from train.build_data import cli as build_data_cli
from train.corpora import HELD_OUT_PLAYS, KJV_FILLER_BOOK, KJV_HELDOUT_BOOKS

pytest.importorskip("torch", reason="SmolLM2's tokenizer comes from the [torch] extra's "
                                    "materialisation")


@pytest.fixture(scope="module")
def tokenizer(smollm2_hf_dir):
    from cca_jax.loading import load_tokenizer
    return load_tokenizer(smollm2_hf_dir)


def _encoder(tokenizer):
    return lambda texts: tokenizer(list(texts), add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def built(smollm2_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "data"
    manifest = build_data.build(smollm2_hf_dir, out, tokens=60_000, seq_len=512, seed=3,
                                heldout_sequences=4, progress=False)
    return out, manifest


def test_code_sources_hold_out_whole_packages():
    files = sources.code_files()
    assert any(f.split == "train" for f in files)
    held = [f for f in files if f.split == "heldout"]
    assert {f.group.split(":")[1] for f in held} == set(sources.HELDOUT_CODE_PACKAGES)
    for f in files:
        package = f.group.split(":", 1)[1]
        if f.group.startswith("stdlib:") and package in sources.HELDOUT_CODE_PACKAGES:
            assert f.split == "heldout", f.path
        else:
            assert f.split == "train", f.path


def test_prose_sources_hold_out_what_the_evaluation_reads():
    docs = sources.prose_documents()
    held = {(d.group, d.name) for d in docs if d.split == "heldout"}
    assert held == ({("plays", p.split("/")[-1][:-3]) for p in HELD_OUT_PLAYS}
                    | {("kjv", b) for b in KJV_HELDOUT_BOOKS + (KJV_FILLER_BOOK,)})


def test_no_heldout_source_reaches_training(built):
    out, manifest = built
    records = manifest["sources"]
    assert all(r["train_tokens"] == 0 for r in records if r["split"] == "heldout")
    trained = [r for r in records if r["train_tokens"] > 0]
    assert trained and all(r["split"] == "train" for r in trained)
    assert {r["kind"] for r in trained} == {"code", "prose"}
    # The files the evaluation reads are listed, and held out.
    heldout_paths = {r["path"] for r in records if r["split"] == "heldout"}
    for f in sources.code_files():
        if f.split == "heldout":
            assert f.path in heldout_paths


def test_mix_shares_hold_within_two_percent(built, tokenizer):
    out, manifest = built
    _, train, heldout = build_data.load_built(out)
    assert train.shape == (manifest["train_sequences"], 513) and heldout.shape == (4, 513)
    for kind, share in build_data.DEFAULT_MIX.items():
        assert abs(manifest["mix_built"][kind] - share) <= 0.02, kind
    # Recount the retrieval sequences from the rows themselves: they start with a header.
    headers = tuple(t.header for t in (synthetic._Ledger(), synthetic._Trace(["x"], np.random.default_rng(0)),
                                       synthetic._Lines(["x"], np.random.default_rng(0))))
    starts = [tokenizer.decode(row[:16]) for row in train]
    retrieval = sum(s.startswith(headers) for s in starts)
    assert retrieval == manifest["sequences"]["retrieval"]
    assert abs(retrieval / len(train) - build_data.DEFAULT_MIX["retrieval"]) <= 0.02
    assert int(train.max()) < len(tokenizer)


def test_same_seed_same_bytes_with_any_number_of_workers(smollm2_hf_dir, built, tmp_path):
    out, manifest = built
    again = build_data.build(smollm2_hf_dir, tmp_path / "again", tokens=60_000, seq_len=512,
                             seed=3, heldout_sequences=4, progress=False, workers=2)
    for name in (build_data.TRAIN_FILE, build_data.HELDOUT_FILE):
        np.testing.assert_array_equal(np.load(out / name), np.load(tmp_path / "again" / name))
    assert again["sources"] == manifest["sources"]


@pytest.mark.parametrize("template", synthetic.TEMPLATES)
@pytest.mark.parametrize("length", [300, 4097])
def test_synthetic_answers_are_right(tokenizer, template, length):
    encode = _encoder(tokenizer)
    code = [line for line in open(sources.__file__).read().splitlines() if line.strip()]
    prose = ["The quality of mercy is not strained.", "It droppeth as the gentle rain.",
             "Upon the place beneath: it is twice blest."]
    for seed in range(3):
        doc = synthetic.make_document(template, encode, length, np.random.default_rng(seed),
                                      pad=encode(["Notes follow.\n"])[0], code_lines=code,
                                      sentences=prose)
        assert doc.ids.shape == (length,) and doc.asked
        text = tokenizer.decode(doc.ids)
        body, questions = text[:text.rindex("\n\n")], text[text.rindex("\n\n") + 2:]
        asked = [line for line in questions.splitlines() if line]
        assert len(asked) == len(doc.asked)
        for fact, question in zip(doc.asked, asked):
            # The question names the fact's key and gives its value ...
            assert fact.key in question and question.endswith(fact.value)
            # ... and the body states exactly that value for that key, once, where the fact
            # says (its token offset).
            if template == "ledger":
                stated = re.findall(rf"tag {re.escape(fact.key)} => (\d+)", body)
            elif template == "trace":
                stated = re.findall(rf"^{re.escape(fact.key)} = (\d+)$", body, re.M)
            else:
                stated = re.findall(rf"^{re.escape(fact.key)} (.*)$", body, re.M)
            assert stated == [fact.value], (template, fact)
            assert tokenizer.decode(doc.ids[fact.start:]).startswith(
                {"ledger": f"tag {fact.key}", "trace": fact.key, "lines": fact.key}[template])
            assert 0 <= fact.depth <= 1


def test_answers_spread_over_the_context(tokenizer):
    encode = _encoder(tokenizer)
    depths = [f.depth for seed in range(6) for f in synthetic.make_document(
        "ledger", encode, 4097, np.random.default_rng(seed), pad=encode(["x"])[0]).asked]
    assert min(depths) < 0.15 and max(depths) > 0.85


@pytest.mark.parametrize("argv, message", [
    (["--mix", "code=0.5,prose=0.1"], "must sum to 1"),
    (["--mix", "code=0.5,poetry=0.5"], "unknown kind 'poetry'"),
    (["--tokens", "lots"], "--tokens must be a count"),
    (["--seq-len", "1"], "--seq-len must be >= 2"),
    (["--workers", "0"], "--workers must be >= 1"),
])
def test_bad_arguments(smollm2_hf_dir, tmp_path, capsys, argv, message):
    code = build_data_cli.main(["--tokenizer", str(smollm2_hf_dir), "--out", str(tmp_path / "o"),
                            *argv])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_finetune_refuses_data_built_for_another_length_or_tokenizer(built, tokenizer):
    from train.data import load_built_data
    out, _ = built
    with pytest.raises(ValueError, match="was built for --seq-len 512, not 256"):
        load_built_data(out, tokenizer, 256, 49152)
    with pytest.raises(ValueError, match="outside the model's vocabulary of 1000"):
        load_built_data(out, tokenizer, 512, 1000)
    original = (out / build_data.MANIFEST).read_text()
    try:
        for key, change in (("vocab_size", lambda v: v + 1),
                            ("probe_ids", lambda v: v[:-1] + [v[-1] + 1]),
                            ("vocabulary_sha256", lambda v: "0" * 64)):
            manifest = json.loads(original)
            manifest["tokenizer"][key] = change(manifest["tokenizer"][key])
            (out / build_data.MANIFEST).write_text(json.dumps(manifest))
            with pytest.raises(ValueError, match=f"another tokenizer .*differing: {key}"):
                load_built_data(out, tokenizer, 512, 49152)
    finally:
        (out / build_data.MANIFEST).write_text(original)
    load_built_data(out, tokenizer, 512, 49152)
