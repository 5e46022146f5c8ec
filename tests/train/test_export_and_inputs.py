"""Hugging Face input directories, and bad input (in this process: no multi-device jax
needed, and every error must come before any compute). The export of the 8x1 reference run is
checked in test_finetune_cli.py, the file that makes that run."""
from __future__ import annotations

import json
import time

import pytest

from tests.train.conftest import read_jsonl, run_finetune
from cca_jax.rope import parse_rope_scaling
from train import finetune
from train.finetune import cli


def test_hugging_face_directory_as_model(tiny, tmp_path):
    """--model accepts a Hugging Face directory (here written from the tiny model)."""
    from cca_jax.converted import load_converted
    from cca_jax.hf import write_hf_dir

    config, params = load_converted(tiny.model)
    hf_dir = write_hf_dir(tmp_path / "hf", params, config, tokenizer_src=tiny.model)
    out = tmp_path / "run"
    result = run_finetune(["--model", hf_dir, "--data", *tiny.train, "--out", out,
                           "--seq-len", "16", "--attention", "full", "--batch-size", "4",
                           "--grad-accum", "2", "--mesh=-1x2", "--steps", "2",
                           "--eval-sequences", "2", "--remat", "full",
                           "--export-dtype", "bfloat16"], devices=4)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fsdp=2 x tensor=2" in result.stdout
    assert "held-out: the last" in result.stdout
    assert len(read_jsonl(out / "metrics.jsonl")) == 2
    exported = json.loads((out / "export" / "cca_config.json").read_text())
    assert exported["param_dtype"] == "bfloat16" and exported["attention"] == "full"


def test_fine_tuning_is_a_library_call(tiny, tmp_path):
    """train.finetune.run(FinetuneJob(...)): the job checks its fields when it is made
    (UsageError naming the flag), and the run says what it did."""
    with pytest.raises(finetune.UsageError, match="--steps must be >= 1, got 0"):
        finetune.FinetuneJob(steps=0)
    with pytest.raises(finetune.UsageError, match="--attention must be one of cca, full"):
        finetune.FinetuneJob(attention="sliding")
    job = finetune.FinetuneJob(model=tiny.model, data=tiny.train, eval_data=tiny.eval,
                               out=tmp_path / "run", seq_len=32, group_size=4, window_size=8,
                               batch_size=8, lr=3e-3, warmup_steps=2, seed=3, steps=2,
                               no_export=True)
    assert job.data == tuple(str(f) for f in tiny.train)
    result = finetune.run(job)
    assert (result.out, result.step, result.steps, result.interrupted) == (
        tmp_path / "run", 2, 2, False)
    evals = read_jsonl(result.out / "eval.jsonl")
    assert [e["perplexity"] for e in evals] == [result.perplexity_before,
                                                 result.perplexity_after]
    assert result.perplexity_after < result.perplexity_before


def _fails(capsys, argv, *needles):
    start = time.perf_counter()
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert time.perf_counter() - start < 60
    return err


def test_missing_data_file(tiny, tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    _fails(capsys, ["--model", tiny.model, "--data", missing, "--out", tmp_path / "o"],
           "--data", "does not exist", str(missing))
    assert not (tmp_path / "o").exists()


def test_unsupported_data(tiny, tmp_path, capsys):
    (tmp_path / "x.csv").write_text("a,b\n")
    _fails(capsys, ["--model", tiny.model, "--data", tmp_path / "x.csv", "--out", tmp_path / "o"],
           "unsupported suffix")
    _fails(capsys, ["--model", tiny.model, "--data", tmp_path, "--out", tmp_path / "o"],
           "not a saved Hugging Face dataset")


def test_empty_corpus(tiny, tmp_path, capsys):
    for i in range(2):
        (tmp_path / f"empty{i}.txt").write_text("  \n")
    _fails(capsys, ["--model", tiny.model, "--data", tmp_path / "empty0.txt",
                    tmp_path / "empty1.txt", "--out", tmp_path / "o", "--seq-len", "32",
                    "--window-size", "8", "--group-size", "4"],
           "training corpus is empty")
    (tmp_path / "short.txt").write_text("the king sleeps")
    _fails(capsys, ["--model", tiny.model, "--data", tmp_path / "short.txt", "--out",
                    tmp_path / "o", "--seq-len", "32", "--window-size", "8", "--group-size", "4"],
           "too few for 1 sequence")
    assert not (tmp_path / "o").exists()


def test_non_utf8_or_binary_data_is_an_error_naming_the_file(tiny, tmp_path, capsys):
    from tests.train.test_units import _bad_data_files

    for name, message in _bad_data_files(tmp_path / "bad").items():
        bad = tmp_path / "bad" / name
        err = _fails(capsys, ["--model", tiny.model, "--data", *tiny.train, bad, "--out",
                              tmp_path / "o", "--seq-len", "32", "--window-size", "8",
                              "--group-size", "4"],
                     f"error: --data: {str(bad)!r}", message)
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
    bad = tmp_path / "bad" / "latin1.txt"
    _fails(capsys, ["--model", tiny.model, "--data", *tiny.train, "--eval-data", bad, "--out",
                    tmp_path / "o", "--seq-len", "32", "--window-size", "8", "--group-size", "4"],
           f"error: --eval-data: {str(bad)!r} is not UTF-8 text")
    assert not (tmp_path / "o").exists()


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_before_compute(tiny, tmp_path,
                                                                         capsys):
    """The tiny model has a vocabulary of 64; a tokenizer with 70 ids gave NaN losses."""
    import shutil

    from tests.train.tiny import SPECIALS, VOCAB_SIZE, WORDS, write_tokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny.model, model)
    extra = tuple(f"w{i}" for i in range(70 - len(SPECIALS) - len(WORDS)))
    write_tokenizer(model, extra_words=extra)
    (tmp_path / "doc.txt").write_text(" ".join(tuple(WORDS) + extra) * 20)
    _fails(capsys, ["--model", model, "--data", tmp_path / "doc.txt", "--out", tmp_path / "o",
                    "--seq-len", "32", "--window-size", "8", "--group-size", "4"],
           f"error: the tokenizer of {str(model)!r} has 70 token ids but the model's "
           f"vocabulary (vocab_size) has {VOCAB_SIZE}: ids 64 to 69 have no embedding row")
    assert not (tmp_path / "o").exists()


def test_seq_len_shorter_than_window_plus_group(tiny, tmp_path, capsys):
    _fails(capsys, ["--model", tiny.model, "--data", *tiny.train, "--out", tmp_path / "o",
                    "--seq-len", "64", "--window-size", "60", "--group-size", "8"],
           "--seq-len 64 is shorter than window_size + group_size", "68", "--attention full")
    # With full attention the window does not matter.
    finetune.FinetuneJob(seq_len=64, window_size=60, attention="full")


def test_mesh_that_does_not_fit(tiny, tmp_path, capsys):
    import jax

    n = jax.device_count()
    _fails(capsys, ["--model", tiny.model, "--data", *tiny.train, "--out", tmp_path / "o",
                    "--mesh", f"{n + 2}x1"],
           f"--mesh {n + 2}x1 needs {n + 2} devices, but {n} are available")
    _fails(capsys, ["--model", tiny.model, "--data", *tiny.train, "--out", tmp_path / "o",
                    "--mesh", "4"], "DxT, DxFxT, DxFxTxC or AXIS=N")


def test_batch_must_split_over_the_mesh(tiny, tmp_path, capsys, monkeypatch):
    """In this process, told that there are 8 devices: the check reads only the device count
    and refuses before any device is used (test_finetune_cli.py makes the same check in its
    process with 8 real devices, with a -1 in the mesh)."""
    import jax

    monkeypatch.setattr(jax, "device_count", lambda *backend: 8)
    _fails(capsys, tiny.args(tmp_path / "o", "--mesh", "8x1", "--batch-size", "4"),
           "must be a multiple of the batch axes of the mesh (8")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "inf", "--lr must be a finite number > 0, got inf"),
    ("--lr", "nan", "--lr must be a finite number > 0, got nan"),
    ("--lr", "-1e-3", "--lr must be a finite number > 0, got -0.001"),
    ("--weight-decay", "inf", "--weight-decay must be a finite number >= 0, got inf"),
    ("--weight-decay", "-0.1", "--weight-decay must be a finite number >= 0, got -0.1"),
    ("--clip", "nan", "--clip must be a finite number >= 0, got nan"),
    ("--clip", "-inf", "--clip must be a finite number >= 0, got -inf"),
    ("--rope-theta", "inf", "--rope-theta must be a finite number > 0, got inf"),
    ("--rope-theta", "0", "--rope-theta must be a finite number > 0, got 0.0"),
    ("--rope-scaling", "linear:inf", "--rope-scaling factor must be a finite number > 0, got inf"),
    ("--rope-scaling", "dynamic:-2", "--rope-scaling factor must be a finite number > 0, got -2.0"),
])
def test_non_finite_or_negative_numbers_are_refused_before_anything_loads(tmp_path, capsys,
                                                                         flag, value, message):
    # The model does not exist: the flag must be refused before anything is read.
    _fails(capsys, ["--model", tmp_path / "no-model", "--data", tmp_path / "no.txt", "--out",
                    tmp_path / "o", f"{flag}={value}"], f"error: {message}")
    assert not (tmp_path / "o").exists()


def test_help_lists_every_flag():
    text = cli.build_parser().format_help()
    for flag in ("--model", "--data", "--out", "--steps", "--seq-len", "--batch-size",
                 "--attention", "--group-size", "--window-size", "--lr", "--warmup-steps",
                 "--save-every", "--eval-every", "--resume", "--rope-theta", "--rope-scaling",
                 "--seed", "--mesh", "--grad-accum", "--remat", "--dtype"):
        assert flag in text, flag


@pytest.mark.parametrize("text, expected", [
    ("linear:4", (("factor", 4.0), ("rope_type", "linear"))),
    ('{"rope_type": "dynamic", "factor": 2}', (("factor", 2), ("rope_type", "dynamic"))),
    ("none", "none"),
])
def test_rope_scaling_flag(text, expected):
    assert parse_rope_scaling(text, "--rope-scaling") == expected


def test_rope_scaling_flag_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="rope"):
        parse_rope_scaling("wobble:2", "--rope-scaling")
    with pytest.raises(ValueError, match="TYPE:FACTOR"):
        parse_rope_scaling("linear:x", "--rope-scaling")
    # The CLI turns them into `error: ...` and exit code 2, before anything is loaded.
    for text, needle in (("wobble:2", "rope"), ("linear:x", "TYPE:FACTOR")):
        assert cli.main(["--rope-scaling", text, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --rope-scaling") and needle in err, err
