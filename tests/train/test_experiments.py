"""CPU tests of `python -m train.experiments`: the planned commands, the comparison against the
fine-tuned full-attention control (targets met and missed), bad input, and one tiny end-to-end
run (two fine-tunes, two evaluations) that a second invocation skips entirely."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.conftest import finetune_env
from tests.train.tiny import make_corpus
from train import experiments as X

REPO = Path(__file__).resolve().parents[2]


def fake_results(label, lengths, ppl, passkey, mdqa) -> dict:
    """A results.json as train.evaluate writes it, reduced to what the comparison reads."""
    return {"label": label, "lengths": lengths, "depths": [0.0, 0.5, 1.0],
            "examples_per_cell": 20,
            "perplexity": {"tail_tokens": 256, "by_length": {
                str(L): {"ppl_tail": p, "ppl_all": p} for L, p in zip(lengths, ppl)}},
            "passkey": {"by_length": {str(L): a for L, a in zip(lengths, passkey)}},
            "mdqa": {"by_length": {str(L): a for L, a in zip(lengths, mdqa)}}}


def write_results(out: Path, name: str, results: dict) -> None:
    folder = out / "eval" / name
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))


def test_plan_lists_every_step_and_marks_finished_ones(tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["--model", "m", "--out", str(out), "--windows", "256", "1024", "--steps", "7",
            "--seq-len", "64", "--lengths", "256", "128", "--dry-run"]
    assert X.main(argv) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if "python -m" in l]
    assert len(lines) == 3 + 6
    # The control first, each fine-tune followed by its evaluation, the untouched model last.
    assert [l.split()[2] for l in lines] == ["train.finetune", "train.evaluate"] * 3 + [
        "train.evaluate"] * 3
    assert "--attention full" in lines[0] and "--window-size" not in lines[0]
    assert "--window-size 256" in lines[2] and "--window-size 1024" in lines[4]
    assert all("--steps 7 --batch-size 1" in l and "--seq-len 64" in l for l in lines[0:6:2])
    # Fine-tuned models are evaluated from their export with the attention they were tuned with.
    assert f"--model {out}/finetune-full/export --attention full" in lines[1]
    assert f"--model {out}/finetune-cca-w256/export --attention cca" in lines[3]
    assert "--window-size 256" in lines[3]
    assert "--model m --attention full" in lines[6] and "--model m --attention cca" in lines[7]
    assert all("--lengths 128 256" in l for l in lines[1::2] + lines[6:])
    # Finished steps are marked and would be skipped.
    (out / "finetune-full" / "export").mkdir(parents=True)
    write_results(out, "full", fake_results("full", [128], [1.0], [0.0], [0.0]))
    assert X.main(argv) == 0
    printed = capsys.readouterr().out
    assert "9 steps, 2 already done" in printed
    assert sum(l.startswith("# done: ") for l in printed.splitlines()) == 2
    assert X.main(argv + ["--skip-untrained"]) == 0
    assert "6 steps, 1 already done" in capsys.readouterr().out
    # A fine-tune whose evaluation exists is not needed again, even with its export gone.
    write_results(out, "cca-w256-ft", fake_results("c", [128], [1.0], [0.0], [0.0]))
    assert X.main(argv) == 0
    done = [l for l in capsys.readouterr().out.splitlines() if l.startswith("# done: ")]
    assert len(done) == 4
    assert "--out " + str(out / "finetune-cca-w256") in done[1]


@pytest.mark.parametrize("ppl_excess, passkey_gap, met", [
    (0.02, -2.0, True),       # at the tolerances: met
    (0.04, 0.0, False),       # perplexity 4% above: missed
    (0.0, -2.5, False),       # passkey 2.5 points below at one length: missed
])
def test_targets_against_the_finetuned_control(tmp_path, ppl_excess, passkey_gap, met):
    lengths = [1024, 8192]
    full_ppl = [20.0, 10.0]
    results = {
        "full-ft": fake_results("full, fine-tuned", lengths, full_ppl, [90.0, 80.0], [70.0, 60.0]),
        "cca-w256-ft": fake_results("CCA w=256, fine-tuned", lengths,
                                    [30.0, 10.0 * (1 + ppl_excess)],   # only 8K counts
                                    [90.0, 80.0 + passkey_gap], [75.0, 60.0]),
    }
    runs = X.plan_runs([256])
    checks = X.compare(runs, results, ppl_tolerance=0.03, accuracy_tolerance=2.0)
    check = checks["cca-w256-ft"]
    assert check["longest_length"] == 8192
    assert check["ppl"]["excess_percent"] == pytest.approx(100 * ppl_excess)
    assert check["passkey"]["worst_gap_points"] == pytest.approx(min(0.0, passkey_gap))
    assert check["mdqa"]["worst_gap_points"] == pytest.approx(0.0)
    assert check["met"] is met
    table = X.comparison_table(runs, results, checks, ppl_tolerance=0.03,
                               accuracy_tolerance=2.0)
    assert "| CCA w=256, fine-tuned | 30.00 |" in table
    assert ("| yes |" in table) is met and ("| no |" in table) is not met
    # Without the control there is nothing to compare with, and it says so.
    del results["full-ft"]
    checks = X.compare(runs, results, ppl_tolerance=0.03, accuracy_tolerance=2.0)
    assert "no fine-tuned full-attention results" in checks["cca-w256-ft"]["error"]


def test_table_only_writes_the_comparison(tmp_path, capsys):
    out = tmp_path / "q"
    lengths = [512, 1024]
    write_results(out, "full-ft", fake_results("full, fine-tuned", lengths, [9, 8], [100, 95],
                                               [80, 70]))
    write_results(out, "cca-w256-ft", fake_results("CCA w=256, fine-tuned", lengths, [9, 8.1],
                                                   [100, 60], [80, 71]))
    assert X.main(["--model", "m", "--out", str(out), "--windows", "256", "--table-only"]) == 0
    printed = capsys.readouterr().out
    assert "-35.0 at 1024 (missed)" in printed and "+1.2% (met)" in printed
    summary = json.loads((out / X.SUMMARY_FILE).read_text())
    assert summary["targets"]["cca-w256-ft"]["met"] is False
    assert summary["runs"]["full"]["evaluated"] is False
    assert (out / X.TABLE_FILE).read_text() in printed
    assert (out / X.PLOT_FILE).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--windows", "256", "0"], "--windows must be >= 1"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--finetune-args", "'unclosed"], "--finetune-args"),
    (["--model", "/nonexistent/model"], "--model"),
])
def test_bad_arguments(tmp_path, capsys, argv, message):
    base = ["--model", str(tmp_path), "--out", str(tmp_path / "q")]
    assert X.main(base + argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_tiny_comparison_end_to_end(tmp_path):
    from flax import nnx

    from convert.checkpoint import save_converted
    from tests.train.test_evaluate import build_tokenizer, tiny_model

    build_tokenizer().save_pretrained(str(tmp_path / "tok"))
    model = tiny_model()
    model_dir = save_converted(tmp_path / "model", nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                               model.config, tokenizer_src=tmp_path / "tok")
    corpus = make_corpus(tmp_path / "corpus", documents=6)
    out = tmp_path / "q"
    cmd = [sys.executable, "-m", "train.experiments", "--model", str(model_dir),
           "--out", str(out), "--windows", "16", "--group-size", "4", "--steps", "3",
           "--seq-len", "64", "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "1",
           "--eval-every", "0", "--lengths", "128", "192", "--examples", "1",
           "--skip-untrained",
           "--finetune-args", "--eval-sequences 1 --data " + " ".join(map(str, corpus)),
           "--eval-args", "--depths 0 100 --ppl-windows 1 --ppl-tail 32 --ppl-sources plays "
                          "--mdqa-doc-tokens 64 --batch-size 2"]
    result = subprocess.run(cmd, cwd=REPO, env=finetune_env(1), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("cca-w16-ft", "full-ft"):
        results = json.loads((out / "eval" / name / "results.json").read_text())
        assert results["lengths"] == [128, 192]
        assert len(results["passkey"]["examples"]) == 2 * 2
    assert (out / "finetune-cca-w16" / "export" / "cca_config.json").is_file()
    commands = (out / X.COMMANDS_FILE).read_text()
    assert commands.count("python -m train.finetune") == 2
    assert commands.count("python -m train.evaluate") == 2
    summary = json.loads((out / X.SUMMARY_FILE).read_text())
    check = summary["targets"]["cca-w16-ft"]
    assert set(check) >= {"ppl", "passkey", "mdqa", "met"}
    assert "| CCA w=16, fine-tuned |" in (out / X.TABLE_FILE).read_text()
    # Everything is done: a rerun runs nothing and rebuilds the same table.
    again = subprocess.run(cmd, cwd=REPO, env=finetune_env(1), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 steps, 4 already done" in again.stdout
    assert (out / X.COMMANDS_FILE).read_text() == commands
