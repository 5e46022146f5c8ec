"""CPU tests of `python -m train.experiments`: the planned commands, the comparison against the
fine-tuned full-attention control (targets met and missed), bad input, and one tiny end-to-end
run (two fine-tunes, two evaluations) that a second invocation skips entirely."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.conftest import finetune_env
from tests.train.tiny import make_corpus
from train import experiments as X
from train.experiments import cli as experiments_cli

REPO = Path(__file__).resolve().parents[2]


def fake_results(label, lengths, ppl, passkey, mdqa, *, examples=100, windows=20,
                 tail=256) -> dict:
    """A results.json as train.evaluate writes it, reduced to what the comparison reads:
    per-example ranking records whose accuracy per length is exactly `passkey` / `mdqa`
    (the first examples right), and per-window tail NLL sums giving perplexity `ppl`."""
    def task(accuracies):
        records = []
        for L, accuracy in zip(lengths, accuracies):
            right = round(examples * accuracy / 100)
            records += [{"length": L, "depth": 0.0, "index": i, "ranked_first": i < right}
                        for i in range(examples)]
        return {"by_length": {str(L): a for L, a in zip(lengths, accuracies)},
                "interval_by_length": {str(L): [max(0, a - 5), min(100, a + 5)]
                                       for L, a in zip(lengths, accuracies)},
                "exact_match": {"by_length": {str(L): a / 2 for L, a in zip(lengths,
                                                                            accuracies)}},
                "examples": records}

    return {"label": label, "lengths": lengths, "depths": [0.0], "examples_per_cell": examples,
            "perplexity": {"tail_tokens": tail, "by_length": {
                str(L): {"ppl_tail": p, "ppl_all": p,
                         "window_tail_nll": [tail * math.log(p)] * windows}
                for L, p in zip(lengths, ppl)}},
            "passkey": task(passkey), "mdqa": task(mdqa)}


def write_results(out: Path, name: str, results: dict) -> None:
    folder = out / "eval" / name
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))


def test_plan_lists_every_step_and_marks_finished_ones(tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["--model", "m", "--out", str(out), "--windows", "256", "1024", "--steps", "7",
            "--seq-len", "64", "--lengths", "256", "128", "--dry-run"]
    assert experiments_cli.main(argv) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if "python -m" in l]
    assert len(lines) == 3 + 6
    # The control first, each fine-tune followed by its evaluation, the untouched model last.
    assert [l.split()[2] for l in lines] == ["train.finetune", "train.evaluate"] * 3 + [
        "train.evaluate"] * 3
    assert "--attention full" in lines[0] and "--window-size" not in lines[0]
    assert "--window-size 256" in lines[2] and "--window-size 1024" in lines[4]
    assert all("--steps 7 --batch-size 8 --grad-accum 1 --lr 2e-05 --warmup-steps 20" in l
               and "--seq-len 64" in l and l.endswith("--overwrite") for l in lines[0:6:2])
    # Fine-tuned models are evaluated from their export with the attention they were tuned with.
    assert f"--model {out}/finetune-full/export --attention full" in lines[1]
    assert f"--model {out}/finetune-cca-w256/export --attention cca" in lines[3]
    assert "--window-size 256" in lines[3]
    assert "--model m --attention full" in lines[6] and "--model m --attention cca" in lines[7]
    assert all("--lengths 128 256" in l for l in lines[1::2] + lines[6:])
    # Finished steps are marked and would be skipped.
    (out / "finetune-full" / "export").mkdir(parents=True)
    write_results(out, "full", fake_results("full", [128], [1.0], [0.0], [0.0]))
    assert experiments_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "9 steps, 2 already done" in printed
    assert sum(l.startswith("# done: ") for l in printed.splitlines()) == 2
    assert experiments_cli.main(argv + ["--skip-untrained"]) == 0
    assert "6 steps, 1 already done" in capsys.readouterr().out
    # A fine-tune whose evaluation exists is not needed again, even with its export gone.
    write_results(out, "cca-w256-ft", fake_results("c", [128], [1.0], [0.0], [0.0]))
    assert experiments_cli.main(argv) == 0
    done = [l for l in capsys.readouterr().out.splitlines() if l.startswith("# done: ")]
    assert len(done) == 4
    assert "--out " + str(out / "finetune-cca-w256") in done[1]


@pytest.mark.parametrize("ppl_excess, passkey_gap, met", [
    (0.03, -5.0, True),       # at the tolerances: met
    (0.04, 0.0, False),       # perplexity 4% above: missed
    (0.0, -6.0, False),       # passkey 6 points below at one length: missed
])
def test_targets_against_the_finetuned_control(tmp_path, ppl_excess, passkey_gap, met):
    lengths = [1024, 8192]
    full_ppl = [20.0, 10.0]
    results = {
        "full-ft": fake_results("full, fine-tuned", lengths, full_ppl, [95.0, 90.0],
                                [70.0, 60.0]),
        "cca-w256-ft": fake_results("CCA w=256, fine-tuned", lengths,
                                    [30.0, 10.0 * (1 + ppl_excess)],   # only 8K counts
                                    [95.0, 90.0 + passkey_gap], [75.0, 60.0]),
    }
    runs = X.plan_runs([256])
    options = dict(ppl_tolerance=0.03, accuracy_tolerance=5.0)
    checks = X.compare(runs, results, control_floor=90.0, **options)
    assert checks["control"]["valid"] is True
    check = checks["cca-w256-ft"]
    assert check["longest_length"] == 8192
    assert check["ppl"]["excess_percent"] == pytest.approx(100 * ppl_excess)
    excess = check["ppl"]["excess_by_length"]["8192"]
    assert excess["value"] == pytest.approx(100 * ppl_excess)
    assert excess["low"] == pytest.approx(excess["value"]) == pytest.approx(excess["high"])
    # 30 -> 10.x: perplexity falls with context.
    assert check["ppl_with_context"]["met"] is True
    gap = check["passkey"]["gap_points_by_length"]["8192"]
    assert check["passkey"]["worst_gap_points"] == pytest.approx(min(0.0, passkey_gap))
    assert gap["value"] == pytest.approx(passkey_gap)
    if passkey_gap:       # paired: the examples CCA lost are a subset; the interval is tight
        assert gap["low"] < passkey_gap < gap["high"] <= 0
    assert check["mdqa"]["worst_gap_points"] == pytest.approx(0.0)
    assert check["met"] is met
    table = X.comparison_table(runs, results, checks, **options)
    assert "| CCA w=256, fine-tuned | 30.00 |" in table
    assert "| CCA w=256, fine-tuned | 95.0 [90, 100] |" in table
    assert "The control (full, fine-tuned) is valid" in table
    assert ("| yes |" in table) is met and ("| no |" in table) is not met
    # A control below the floor at one length is not valid, and the table says so.
    results["full-ft"]["passkey"]["by_length"]["1024"] = 89.0
    checks = X.compare(runs, results, control_floor=90.0, **options)
    assert checks["control"]["valid"] is False
    assert "is NOT valid" in X.comparison_table(runs, results, checks, **options)
    # Without the control there is nothing to compare with, and it says so.
    del results["full-ft"]
    checks = X.compare(runs, results, control_floor=90.0, **options)
    assert "no fine-tuned full-attention results" in checks["cca-w256-ft"]["error"]


def test_rising_perplexity_is_a_missed_target():
    lengths = [1024, 2048, 4096]
    results = {"full-ft": fake_results("full", lengths, [10, 9, 8], [100] * 3, [100] * 3),
               "cca-w256-ft": fake_results("cca", lengths, [10, 9, 9.5], [100] * 3,
                                           [100] * 3)}
    check = X.compare(X.plan_runs([256]), results, ppl_tolerance=0.5, accuracy_tolerance=5,
                      control_floor=90)["cca-w256-ft"]
    assert check["ppl_with_context"]["largest_rise_percent"] == pytest.approx(100 * (9.5 / 9 - 1))
    assert check["ppl_with_context"]["met"] is False and check["met"] is False


def test_table_only_writes_the_comparison(tmp_path, capsys):
    out = tmp_path / "q"
    lengths = [512, 1024]
    write_results(out, "full-ft", fake_results("full, fine-tuned", lengths, [9, 8], [100, 95],
                                               [80, 70]))
    write_results(out, "cca-w256-ft", fake_results("CCA w=256, fine-tuned", lengths, [9, 8.1],
                                                   [100, 60], [80, 71]))
    assert experiments_cli.main(["--model", "m", "--out", str(out), "--windows", "256", "--table-only"]) == 0
    printed = capsys.readouterr().out
    assert "-35.0 at 1024 (missed)" in printed and "+1.2% (met)" in printed
    assert "| CCA w=256, fine-tuned | passkey points | +0.0 [+0.0, +0.0] | -35.0 [" in printed
    summary = json.loads((out / X.SUMMARY_FILE).read_text())
    assert summary["targets"]["cca-w256-ft"]["met"] is False
    assert summary["targets"]["control"]["valid"] is True
    assert summary["runs"]["full"]["evaluated"] is False
    assert (out / X.TABLE_FILE).read_text() in printed
    assert (out / X.PLOT_FILE).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--windows", "256", "0"], "--windows must be >= 1"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--batch-size", "8", "--grad-accum", "3"], "must be a multiple of --grad-accum"),
    (["--time-limit", "0"], "--time-limit must be > 0"),
    (["--finetune-args", "'unclosed"], "--finetune-args"),
    (["--model", "/nonexistent/model"], "--model"),
])
def test_bad_arguments(tmp_path, capsys, argv, message):
    base = ["--model", str(tmp_path), "--out", str(tmp_path / "q")]
    assert experiments_cli.main(base + argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_tiny_comparison_end_to_end(tmp_path, capsys):
    from flax import nnx

    from cca_jax.converted import save_converted
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
                          "--mdqa-doc-tokens 64 --batch-size 2 --copy-docs 1 --copy-windows 1 "
                          "--copy-far 48"]
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
    assert set(check) >= {"ppl", "passkey", "mdqa", "copy_far", "ppl_with_context", "met"}
    table = (out / X.TABLE_FILE).read_text()
    assert "| CCA w=16, fine-tuned |" in table
    assert "| CCA w=16, fine-tuned | 128 | " in table        # the by-depth rows
    assert re.search(r"\| full, fine-tuned \| 3 \| [\d,]+ \| [\d.]+ \| [\d.]+ \| "
                     r"[\d.]+ \(step 0\) -> [\d.]+ \(step 3\) \|", table)
    # Everything is done: a rerun runs nothing and rebuilds the same table (in this process:
    # a new one would only add its start-up).
    capsys.readouterr()
    assert experiments_cli.main(cmd[3:]) == 0, capsys.readouterr().err[-3000:]
    assert "4 steps, 4 already done" in capsys.readouterr().out
    assert (out / X.COMMANDS_FILE).read_text() == commands


def test_a_stopped_finetune_resumes_from_its_checkpoint(tmp_path):
    job = X.ExperimentsJob(model="m", out=tmp_path)
    run = X.plan_runs([1024])[0]
    folder = X.finetune_dir(tmp_path, run)
    assert folder.name == "finetune-cca-w1024"
    assert X.finetune_command(job, run)[-1] == "--overwrite"
    (folder / "checkpoints" / "tmp-partial").mkdir(parents=True)   # not a finished step
    assert X.finetune_command(job, run)[-1] == "--overwrite"
    (folder / "checkpoints" / "40").mkdir()
    assert X.finetune_command(job, run)[-1] == "--resume"


def test_a_hybrid_arm_per_window_is_tuned_evaluated_and_compared(tmp_path, capsys):
    """--hybrid-layers adds, per window, a fine-tune of CCA with full attention in those layers
    (its own folder; the evaluation reads the layers from its export) that the comparison
    sets against the control like the CCA arms."""
    out = tmp_path / "q"
    argv = ["--model", "m", "--out", str(out), "--windows", "256", "--hybrid-layers", "5,2",
            "--lengths", "128", "--skip-untrained", "--dry-run"]
    assert experiments_cli.main(argv) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if "python -m" in l]
    assert len(lines) == 6
    tuned = [l for l in lines if "train.finetune" in l and "finetune-hybrid-w256 " in l + " "]
    assert len(tuned) == 1
    assert "--attention cca --group-size 16 --window-size 256 --full-attention-layers 2,5" in \
        tuned[0]
    assert sum("--full-attention-layers" in l for l in lines) == 1
    assert any(f"--model {out}/finetune-hybrid-w256/export --attention cca" in l
               and "--label 'hybrid w=256 (full layers 2,5), fine-tuned'" in l for l in lines)

    runs = X.plan_runs([256], (2, 5))
    lengths = [1024, 8192]
    results = {"full-ft": fake_results("full, fine-tuned", lengths, [20.0, 10.0], [95.0, 95.0],
                                       [70.0, 60.0]),
               "hybrid-w256-ft": fake_results("h", lengths, [20.0, 10.1], [95.0, 85.0],
                                              [70.0, 60.0])}
    checks = X.compare(runs, results, ppl_tolerance=0.03, accuracy_tolerance=5.0,
                       control_floor=90.0)
    assert checks["hybrid-w256-ft"]["passkey"]["worst_gap_points"] == pytest.approx(-10.0)
    assert checks["hybrid-w256-ft"]["met"] is False
    table = X.comparison_table(runs, results, checks, ppl_tolerance=0.03,
                               accuracy_tolerance=5.0)
    assert "| hybrid w=256 (full layers 2,5), fine-tuned | 20.00 | 10.10 |" in table

    with pytest.raises(SystemExit) as exit_info:      # argparse: usage error, exit code 2
        experiments_cli.main(argv[:-1] + ["--hybrid-layers", "2,2", "--dry-run"])
    assert exit_info.value.code == 2
    assert "--hybrid-layers: layer 2 is listed more than once" in capsys.readouterr().err
    with pytest.raises(X.UsageError, match="--hybrid-layers"):
        X.ExperimentsJob(model="m", hybrid_layers=(-1,))


CHILD = """
import signal, sys, time
got = []
signal.signal(signal.SIGTERM, lambda *a: got.append(1))
print("ready", flush=True)
deadline = time.time() + 30
while not got and time.time() < deadline:
    time.sleep(0.05)
time.sleep(0.5)                       # a second signal would arrive now
open(sys.argv[1], "w").write(str(len(got)))
"""


def test_time_limit_stops_a_step_with_exactly_one_signal(tmp_path):
    import time

    report = tmp_path / "signals"
    with pytest.raises(X.Interrupted, match="--time-limit"):
        X.run_step([sys.executable, "-c", CHILD, str(report)], tmp_path, "child",
                   deadline=time.monotonic() + 2.0)
    assert report.read_text() == "1"
    assert "ready" in (tmp_path / "logs" / "child.log").read_text()
    X._STOP.clear()
