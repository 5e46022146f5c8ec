"""--full-attention-layers through the training and evaluation command lines: a one-step
hybrid fine-tune (in this process, one CPU device) records the layers in its export, and
train.evaluate and cca_jax.generate take them from there unless told otherwise; --resume
refuses other layers; bad values are `error:` lines with exit code 2."""
from __future__ import annotations

import json

import pytest

from train import evaluate as E
from train import finetune
from train.evaluate import cli as evaluate_cli
from train.finetune import cli as finetune_cli

ARGS = ["--seq-len", "32", "--group-size", "4", "--window-size", "8", "--batch-size", "2",
        "--steps", "1", "--eval-sequences", "0", "--seed", "3"]


def test_finetune_records_the_layers_and_evaluate_and_generate_take_them(tiny, tmp_path,
                                                                         capsys):
    out = tmp_path / "run"
    argv = [str(a) for a in ["--model", tiny.model, "--data", *tiny.train, "--out", out, *ARGS,
                             "--full-attention-layers", "1"]]
    assert finetune_cli.main(argv) == 0
    stdout = capsys.readouterr().out
    assert "attention cca g=4 w=8, full attention in layers 1;" in stdout
    exported = json.loads((out / "export" / "cca_config.json").read_text())
    assert exported["attention"] == "cca" and exported["full_attention_layers"] == [1]

    # --resume with other layers is refused before any compute.
    assert finetune_cli.main(argv + ["--resume", "--steps", "2", "--full-attention-layers",
                                 "none"]) == 2
    assert "--full-attention-layers [1] -> []" in capsys.readouterr().err

    # train.evaluate: the export's layers by default, the flag's when given.
    common = ["--model", str(out / "export"), "--lengths", "32", "--tasks", "ppl",
              "--ppl-sources", "--ppl-files", *map(str, tiny.eval), "--ppl-windows", "1",
              "--batch-size", "1", "--no-progress"]
    assert evaluate_cli.main(common + ["--out", str(tmp_path / "a")]) == 0
    a = json.loads((tmp_path / "a" / E.RESULTS_FILE).read_text())
    assert a["full_attention_layers"] == [1] and a["label"].endswith("-g4-w8-full1")
    assert "full-attention layers from the model directory" in a["attention_from"]
    assert "full attention in layers 1)" in capsys.readouterr().err
    assert evaluate_cli.main(common + ["--full-attention-layers", "none", "--out",
                            str(tmp_path / "b")]) == 0
    b = json.loads((tmp_path / "b" / E.RESULTS_FILE).read_text())
    assert b["full_attention_layers"] == [] and b["attention"] == "cca"
    assert b["perplexity"] != a["perplexity"]
    capsys.readouterr()
    assert evaluate_cli.main(common + ["--full-attention-layers", "7", "--out", str(tmp_path / "c")]) == 2
    assert "error: --full-attention-layers: layer 7 is out of range" in capsys.readouterr().err

    # cca_jax.generate on the export: the same layers, in the load line and the cache report.
    from cca_jax.generate.cli import main as generate_main

    assert generate_main(["--model", str(out / "export"), "--prompt", "the king and the queen",
                          "--max-new-tokens", "3", "--group-size", "4", "--window-size", "8",
                          "--ignore-eos"]) == 0
    err = capsys.readouterr().err
    assert "full attention in layers 1)" in err and "1 full-attention layer " in err


def test_finetune_flag_errors(tiny, tmp_path, capsys):
    base = ["--model", str(tiny.model), "--data", *map(str, tiny.train), "--out",
            str(tmp_path / "o"), *ARGS]
    assert finetune_cli.main(base + ["--full-attention-layers", "2"]) == 2
    assert "error: --full-attention-layers: layer 2 is out of range (the model has 2 layers" \
        in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        finetune_cli.main(base + ["--full-attention-layers", "1,1"])
    assert exit_info.value.code == 2
    assert "argument --full-attention-layers: layer 1 is listed more than once" in \
        capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_checkpoints_from_before_the_flag_resume_as_no_layers():
    meta = {"step": 1, "trajectory": {"lr": 1.0}}
    finetune.check_resumable(meta, {"lr": 1.0, "full_attention_layers": []}, steps=2)
    with pytest.raises(finetune.UsageError, match=r"--full-attention-layers \[\] -> \[3\]"):
        finetune.check_resumable(meta, {"lr": 1.0, "full_attention_layers": [3]}, steps=2)
