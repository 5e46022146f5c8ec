"""Does CCA keep a model's quality? One call runs the comparison: `run(ExperimentsJob(...))`,
or `python -m train.experiments` (the command line, `train/experiments/cli.py`).

For one pretrained model it runs, in this order, each as its own subprocess whose command line
is logged to OUT/commands.sh:

1. fine-tunes (`python -m train.finetune`) of full attention (the control) and of CCA with
   group size g and each local window w (and, with --hybrid-layers, of a hybrid per window:
   CCA with full attention in those layers), all by the same recipe and data order, each
   followed at once by its evaluation (`python -m train.evaluate`);
2. evaluations of the model as it is: full attention, and CCA plugged in with no training;
3. the comparison: OUT/table.md (perplexity, passkey and multi-document QA ranking accuracy
   with Wilson intervals, greedy exact match, far copying, per length; CCA minus the control
   with paired bootstrap intervals; whether the control is valid, its passkey accuracy at
   least --control-floor at every length; and the targets: CCA's perplexity at the longest
   length within --ppl-tolerance of the control's and not rising with context, its ranking
   accuracies not more than --accuracy-tolerance points below at any length),
   OUT/summary.json and OUT/comparison.png.

A step whose output already exists (OUT/eval/<run>/results.json for an evaluation; for a
fine-tune its export, OUT/finetune-*/export, or its evaluation's results) is skipped, and a
fine-tune that was stopped resumes from its checkpoint, so an interrupted comparison
continues where it stopped: `--time-limit SECONDS` (or SIGINT/SIGTERM) stops it with the
running fine-tune's checkpoint saved, exit code 3, for time-sliced machines. `--table-only`
rebuilds the comparison from what is there.

    python -m train.experiments --model models/smollm2 --out runs/quality \
        --steps 1250 --batch-size 8 --seq-len 8192 --windows 1024 \
        --finetune-args "--data data/long8k" --lengths 1024 2048 4096 8192
"""
from __future__ import annotations

import datetime
import json
import math
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cca_jax.config import DEFAULT_CCA, check_layer_indices, describe_layers
from cca_jax.io import atomic_write_text
from train import statistics
from train.plots import length_axis, save_figure

TASKS = ("passkey", "mdqa")
TABLE_FILE, SUMMARY_FILE, PLOT_FILE, COMMANDS_FILE = (
    "table.md", "summary.json", "comparison.png", "commands.sh")


@dataclass(frozen=True)
class Run:
    """One evaluated model: `name` is its folder under OUT/eval."""
    name: str
    label: str
    attention: str            # "cca" or "full"
    window: int | None        # CCA window, None for full attention
    finetuned: bool
    full_layers: tuple[int, ...] = ()   # a hybrid: CCA with full attention in these layers

    @property
    def kind(self) -> str:
        """"full", "cca" or "hybrid" (the fine-tune's folder name starts with it)."""
        return "hybrid" if self.full_layers else self.attention


def plan_runs(windows: list[int], hybrid_layers: tuple[int, ...] = ()) -> list[Run]:
    """Evaluated models, fine-tuned first (the comparison's core), then the untouched model."""
    runs = [Run(f"cca-w{w}-ft", f"CCA w={w}, fine-tuned", "cca", w, True) for w in windows]
    if hybrid_layers:
        runs += [Run(f"hybrid-w{w}-ft",
                     f"hybrid w={w} (full layers {describe_layers(hybrid_layers)}), fine-tuned",
                     "cca", w, True, tuple(hybrid_layers)) for w in windows]
    runs.append(Run("full-ft", "full, fine-tuned", "full", None, True))
    runs.append(Run("full", "full, as is", "full", None, False))
    runs += [Run(f"cca-w{w}", f"CCA w={w}, no training", "cca", w, False) for w in windows]
    return runs


def finetune_dir(out: Path, run: Run) -> Path:
    return out / ("finetune-full" if run.kind == "full" else f"finetune-{run.kind}-w{run.window}")


def has_checkpoint(folder: Path) -> bool:
    checkpoints = folder / "checkpoints"
    return checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())


def finetune_command(job: ExperimentsJob, run: Run) -> list[str]:
    """The fine-tune of one arm; it resumes from its checkpoint when a slice was cut short."""
    folder = finetune_dir(job.out, run)
    cmd = [sys.executable, "-m", "train.finetune", "--model", str(job.model),
           "--attention", run.attention]
    if run.attention == "cca":
        cmd += ["--group-size", str(job.group_size), "--window-size", str(run.window)]
    if run.full_layers:
        cmd += ["--full-attention-layers", describe_layers(run.full_layers)]
    cmd += ["--seq-len", str(job.seq_len), "--steps", str(job.steps),
            "--batch-size", str(job.batch_size), "--grad-accum", str(job.grad_accum),
            "--lr", str(job.lr), "--warmup-steps", str(job.warmup_steps),
            "--eval-every", str(job.eval_every), "--seed", str(job.seed), "--out", str(folder),
            "--resume" if has_checkpoint(folder) else "--overwrite"]
    return cmd + shlex.split(job.finetune_args)


def evaluate_command(job: ExperimentsJob, run: Run) -> list[str]:
    # A hybrid's export records its full layers (the evaluation reads them from there).
    model = finetune_dir(job.out, run) / "export" if run.finetuned else Path(job.model)
    cmd = [sys.executable, "-m", "train.evaluate", "--model", str(model),
           "--attention", run.attention]
    if run.attention == "cca":
        cmd += ["--group-size", str(job.group_size), "--window-size", str(run.window)]
    cmd += ["--lengths", *map(str, job.lengths), "--examples", str(job.examples),
            "--seed", str(job.seed), "--label", run.label,
            "--out", str(job.out / "eval" / run.name), "--no-progress"]
    return cmd + shlex.split(job.eval_args)


def _display(cmd: list[str]) -> str:
    """The command as a user would type it (`python` for this interpreter)."""
    return shlex.join(["python" if cmd[0] == sys.executable else cmd[0]] + cmd[1:])


class Interrupted(Exception):
    """The comparison was stopped (signal or --time-limit); a rerun continues it."""


class StepFailed(RuntimeError):
    """A fine-tune or evaluation ended with an error (its log says which)."""


_STOP: list[str] = []     # why the comparison must stop, once a signal or the deadline came


def _request_stop(signum, frame) -> None:
    _STOP.append(signal.Signals(signum).name)


def run_step(cmd: list[str], out: Path, log_name: str, deadline: float | None = None) -> None:
    """Run `cmd`, teeing its output to OUT/logs/<log_name>.log; raise if it fails.

    On SIGINT/SIGTERM to this process, or at `deadline` (time.monotonic()), the step gets one
    SIGTERM (a fine-tune then stops after its current step with a checkpoint) and
    `Interrupted` is raised once it has ended. The step runs in its own process group, so a
    signal sent to this whole group (e.g. by `timeout`) reaches it only through here, once.
    """
    (out / "logs").mkdir(parents=True, exist_ok=True)
    with open(out / COMMANDS_FILE, "a") as f:
        f.write(f"# {datetime.datetime.now().isoformat(timespec='seconds')}\n{_display(cmd)}\n")
    print(f"\n$ {_display(cmd)}", flush=True)
    start = time.perf_counter()
    with open(out / "logs" / f"{log_name}.log", "a") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, start_new_session=True)
        reader = threading.Thread(target=_tee, args=(proc.stdout, log), daemon=True)
        reader.start()
        forwarded = False
        while proc.poll() is None:
            if deadline is not None and time.monotonic() >= deadline and not _STOP:
                _STOP.append("--time-limit")
            if _STOP and not forwarded:
                print(f"[{_STOP[0]}: asking {log_name} to stop (a fine-tune saves a "
                      "checkpoint first)]", flush=True)
                proc.send_signal(signal.SIGTERM)
                forwarded = True
            time.sleep(0.2)
        reader.join()
        code = proc.wait()
    print(f"[{log_name}: exit {code} after {time.perf_counter() - start:.0f} s]", flush=True)
    if _STOP:
        raise Interrupted(f"stopped by {_STOP[0]} during {log_name}")
    if code != 0:
        raise StepFailed(f"step {log_name} failed with exit code {code}; see "
                           f"{out / 'logs' / (log_name + '.log')}")


def _tee(stream, log) -> None:
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()
        log.write(line)
        log.flush()


# ------------------------------------------------------------------------------ comparison


def load_results(out: Path, runs: list[Run]) -> dict[str, dict]:
    """results.json of every run that has one, by run name."""
    found = {}
    for run in runs:
        path = out / "eval" / run.name / "results.json"
        if path.is_file():
            found[run.name] = json.loads(path.read_text())
    return found


def _ppl_at(results: dict, length: int) -> float | None:
    entry = results.get("perplexity", {}).get("by_length", {}).get(str(length))
    return entry["ppl_tail"] if entry else None


def _acc_at(results: dict, task: str, length: int) -> float | None:
    return results.get(task, {}).get("by_length", {}).get(str(length))


def _paired_records(ours: dict, control: dict, task: str, length: int):
    """(ours, control) ranked_first flags of the examples both answered at `length`."""
    key = lambda r: (r["depth"], r["index"])  # noqa: E731
    theirs = {key(r): r for r in control.get(task, {}).get("examples", [])
              if r["length"] == length}
    pairs = [(r["ranked_first"], theirs[key(r)]["ranked_first"])
             for r in ours.get(task, {}).get("examples", [])
             if r["length"] == length and key(r) in theirs]
    return [a for a, _ in pairs], [b for _, b in pairs]


def _interval(triple) -> dict:
    value, low, high = triple
    return {"value": value, "low": low, "high": high}


def compare(runs: list[Run], results: dict[str, dict], *, ppl_tolerance: float,
            accuracy_tolerance: float, control_floor: float) -> dict:
    """Each fine-tuned CCA run against the fine-tuned full-attention run (the control), with
    paired 95% bootstrap intervals, and whether the control itself is valid."""
    control = results.get("full-ft")
    checks: dict = {}
    if control is not None:
        accuracy = {str(L): _acc_at(control, "passkey", L) for L in control["lengths"]}
        known = [v for v in accuracy.values() if v is not None]
        checks["control"] = {"label": "full, fine-tuned", "passkey_by_length": accuracy,
                             "floor": control_floor,
                             "valid": bool(known) and min(known) >= control_floor}
    for run in runs:
        if not (run.finetuned and run.attention == "cca") or run.name not in results:
            continue
        if control is None:
            checks[run.name] = {"error": "no fine-tuned full-attention results to compare with"}
            continue
        ours = results[run.name]
        lengths = [L for L in ours["lengths"] if L in control["lengths"]]
        longest = max(lengths)
        check: dict = {"label": run.label, "longest_length": longest}
        if "perplexity" in ours and "perplexity" in control:
            tail = ours["perplexity"]["tail_tokens"]
            by_length = {}
            for L in lengths:
                a = ours["perplexity"]["by_length"][str(L)].get("window_tail_nll")
                b = control["perplexity"]["by_length"][str(L)].get("window_tail_nll")
                if a and b and len(a) == len(b):
                    by_length[str(L)] = _interval(statistics.perplexity_ratio(a, b, tail))
            own = [_ppl_at(ours, L) for L in lengths]
            rises = [100 * (own[i + 1] / own[i] - 1) for i in range(len(own) - 1)]
            p_ours, p_full = _ppl_at(ours, longest), _ppl_at(control, longest)
            check["ppl"] = {"cca": p_ours, "full": p_full,
                            "excess_percent": 100 * (p_ours / p_full - 1),
                            "excess_by_length": by_length,
                            "met": p_ours / p_full <= 1 + ppl_tolerance + 1e-9}
            check["ppl_with_context"] = {
                "by_length": dict(zip(map(str, lengths), own)),
                "largest_rise_percent": max(rises) if rises else 0.0,
                "met": not rises or max(rises) <= 1.0}
        for task in TASKS:
            gaps = {}
            for L in lengths:
                a, b = _paired_records(ours, control, task, L)
                if a:
                    gaps[str(L)] = _interval(statistics.accuracy_difference(a, b))
            if gaps:
                worst = min(gaps, key=lambda L: gaps[L]["value"])
                check[task] = {"gap_points_by_length": gaps, "worst_length": int(worst),
                               "worst_gap_points": gaps[worst]["value"],
                               "met": gaps[worst]["value"] >= -accuracy_tolerance - 1e-9}
        if "copy" in ours and "copy" in control:
            gaps = {}
            for L in lengths:
                a = ours["copy"]["by_length"][str(L)]["windows"]
                b = control["copy"]["by_length"][str(L)]["windows"]
                if sum(w["far_targets"] for w in b):
                    gaps[str(L)] = _interval(statistics.ratio_difference(
                        [w["far_hits"] for w in a], [w["far_targets"] for w in a],
                        [w["far_hits"] for w in b], [w["far_targets"] for w in b]))
            check["copy_far"] = {"gap_points_by_length": gaps}
        check["met"] = all(v["met"] for k, v in check.items()
                           if isinstance(v, dict) and "met" in v)
        checks[run.name] = check
    return checks


def _cell(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _gap_cell(gap: dict | None, digits: int = 1, unit: str = "") -> str:
    if not gap:
        return "-"
    return (f"{gap['value']:+.{digits}f}{unit} [{gap['low']:+.{digits}f}, "
            f"{gap['high']:+.{digits}f}]")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] *
                                                             (len(header) - 1)) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows])


def _accuracy_cell(results: dict, task: str, L: int) -> str:
    value = _acc_at(results, task, L)
    interval = results.get(task, {}).get("interval_by_length", {}).get(str(L))
    if value is None:
        return "-"
    return f"{value:.1f} [{interval[0]:.0f}, {interval[1]:.0f}]" if interval else f"{value:.1f}"


def comparison_table(runs: list[Run], results: dict[str, dict], checks: dict, *,
                     ppl_tolerance: float, accuracy_tolerance: float) -> str:
    """Markdown: one table per measure (rows: runs, columns: lengths), the paired
    differences against the control, then the targets."""
    present = [r for r in runs if r.name in results]
    if not present:
        return "no results yet\n"
    lengths = sorted({L for r in present for L in results[r.name]["lengths"]})
    first = results[present[0].name]
    tail = first.get("perplexity", {}).get("tail_tokens")
    lines = []
    if any("perplexity" in results[r.name] for r in present):
        lines += [f"Held-out perplexity on the last {tail} tokens of each window "
                  "(lower is better)", ""]
        lines += _md_table(["model"] + [str(L) for L in lengths],
                           [[r.label] + [_cell(_ppl_at(results[r.name], L), 2) for L in lengths]
                            for r in present])
        lines.append("")
    for task in TASKS:
        if not any(task in results[r.name] for r in present):
            continue
        n = first.get("examples_per_cell")
        depths = len(first.get("depths", []))
        lines += [f"{task}: true value ranked first among the candidates (%, 95% Wilson "
                  f"interval), {n} examples x {depths} depths per length", ""]
        lines += _md_table(["model"] + [str(L) for L in lengths],
                           [[r.label] + [_accuracy_cell(results[r.name], task, L)
                                         for L in lengths] for r in present])
        lines += ["", f"{task}: greedy exact match (%)", ""]
        lines += _md_table(["model"] + [str(L) for L in lengths],
                           [[r.label] + [_cell(results[r.name].get(task, {}).get(
                               "exact_match", {}).get("by_length", {}).get(str(L)), 1)
                               for L in lengths] for r in present])
        lines.append("")
    if any("copy" in results[r.name] for r in present):
        far = next(results[r.name]["copy"]["far_tokens"] for r in present
                   if "copy" in results[r.name])
        lines += [f"copy: top-1 accuracy (%) on renamed identifiers whose previous occurrence "
                  f"is more than {far} tokens back (all copies in parentheses)", ""]
        rows = []
        for r in present:
            copy = results[r.name].get("copy")
            rows.append([r.label] + ([
                f"{_cell(copy['by_length'][str(L)]['far_accuracy'], 1)} "
                f"({_cell(copy['by_length'][str(L)]['accuracy'], 1)})"
                if str(L) in copy["by_length"] else "-" for L in lengths] if copy else
                ["-"] * len(lengths)))
        lines += _md_table(["model"] + [str(L) for L in lengths], rows)
        lines.append("")
    cca_checks = {k: v for k, v in checks.items() if k != "control"}
    if "control" in checks:
        c = checks["control"]
        lines += [f"The control ({c['label']}) is {'valid' if c['valid'] else 'NOT valid'}: "
                  f"its passkey ranking accuracy is "
                  + ", ".join(f"{_cell(v, 1)} at {L}" for L, v in c["passkey_by_length"].items())
                  + f" (needed: >= {c['floor']:g} at every length).", ""]
    if cca_checks:
        lines += ["CCA minus the control after the same fine-tuning, with paired 95% bootstrap "
                  "intervals (perplexity: percent above; accuracies: points)", ""]
        header = ["CCA run", "measure"] + [str(L) for L in lengths]
        rows = []
        for name, check in cca_checks.items():
            if "error" in check:
                rows.append([name, check["error"]] + [""] * len(lengths))
                continue
            if "ppl" in check:
                by = check["ppl"]["excess_by_length"]
                rows.append([check["label"], "ppl excess %"]
                            + [_gap_cell(by.get(str(L)), 1, "%") for L in lengths])
            for task in TASKS:
                if task in check:
                    by = check[task]["gap_points_by_length"]
                    rows.append([check["label"], f"{task} points"]
                                + [_gap_cell(by.get(str(L))) for L in lengths])
            if check.get("copy_far", {}).get("gap_points_by_length"):
                by = check["copy_far"]["gap_points_by_length"]
                rows.append([check["label"], "copy (far) points"]
                            + [_gap_cell(by.get(str(L))) for L in lengths])
        lines += _md_table(header, rows)
        lines += ["", f"Targets: perplexity at the longest length within "
                      f"{100 * ppl_tolerance:g}% of the control and not rising with context "
                      f"(no step up of more than 1%); ranking accuracies not more than "
                      f"{accuracy_tolerance:g} points below the control at any length", ""]
        rows = []
        for name, check in cca_checks.items():
            if "error" in check:
                continue
            row = [check["label"]]
            p = check.get("ppl")
            row.append(f"{p['excess_percent']:+.1f}% ({'met' if p['met'] else 'missed'})"
                       if p else "-")
            w = check.get("ppl_with_context")
            row.append(f"{w['largest_rise_percent']:+.1f}% ({'met' if w['met'] else 'missed'})"
                       if w else "-")
            for task in TASKS:
                t = check.get(task)
                row.append(f"{t['worst_gap_points']:+.1f} at {t['worst_length']} "
                           f"({'met' if t['met'] else 'missed'})" if t else "-")
            row.append("yes" if check["met"] else "no")
            rows.append(row)
        lines += _md_table(["CCA run", "ppl vs full", "largest ppl rise", "passkey: worst gap",
                            "mdqa: worst gap", "all met"], rows)
        lines.append("")
    return "\n".join(lines)


def comparison_plot(runs: list[Run], results: dict[str, dict], path: Path) -> Path | None:
    """Perplexity and accuracies vs length, one line per run."""
    present = [r for r in runs if r.name in results]
    if not present:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("perplexity", "perplexity (last tokens)")] + [(t, f"{t} accuracy (%)")
                                                           for t in TASKS]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, ylabel) in zip(axes, panels):
        for r in present:
            res = results[r.name]
            lengths = res["lengths"]
            values = [_ppl_at(res, L) if key == "perplexity" else _acc_at(res, key, L)
                      for L in lengths]
            if all(v is None for v in values):
                continue
            ax.plot(lengths, [math.nan if v is None else v for v in values], marker="o",
                    linestyle="-" if r.finetuned else "--", label=r.label)
        length_axis(ax, sorted({L for r in present for L in results[r.name]["lengths"]}))
        if key != "perplexity":
            ax.set_ylim(-3, 103)
        ax.set(xlabel="context length (tokens)", ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return save_figure(fig, path)


def depth_tables(runs: list[Run], results: dict[str, dict]) -> str:
    """Ranking accuracy by depth: one table per task, a row per (run, length)."""
    present = [r for r in runs if r.name in results]
    lines = []
    for task in TASKS:
        rows, depths = [], None
        for r in present:
            cells = results[r.name].get(task, {}).get("by_length_depth", {})
            for L, by_depth in cells.items():
                depths = depths or list(by_depth)
                rows.append([r.label, L] + [_cell(by_depth.get(d), 0) for d in depths])
        if rows:
            lines += [f"{task}: ranked first (%) by depth of the answer (0% = the start of the "
                      "context)", ""]
            lines += _md_table(["model", "length"] + [f"{d}%" for d in depths], rows)
            lines.append("")
    return "\n".join(lines)


def finetune_summary(out: Path, runs: list[Run]) -> str:
    """Per fine-tune: updates, tokens, median tokens/s, loss and held-out perplexity."""
    rows = []
    for r in runs:
        if not r.finetuned:
            continue
        folder = finetune_dir(out, r)
        metrics_file, eval_file = folder / "metrics.jsonl", folder / "eval.jsonl"
        if not metrics_file.is_file():
            continue
        metrics = [json.loads(l) for l in metrics_file.read_text().splitlines() if l.strip()]
        evals = ([json.loads(l) for l in eval_file.read_text().splitlines() if l.strip()]
                 if eval_file.is_file() else [])
        if not metrics:
            continue
        speeds = sorted(m["tokens_per_s"] for m in metrics[10:] or metrics)
        tail = metrics[-50:]
        rows.append([r.label, str(len(metrics)),
                     f"{speeds[len(speeds) // 2]:,.0f}",
                     f"{sum(m['loss'] for m in metrics[:10]) / len(metrics[:10]):.3f}",
                     f"{sum(m['loss'] for m in tail) / len(tail):.3f}",
                     " -> ".join(f"{e['perplexity']:.2f} (step {e['step']})" for e in evals)
                     or "-"])
    if not rows:
        return ""
    return "\n".join(["Fine-tuning (from each run's metrics.jsonl and eval.jsonl)", ""] + _md_table(
        ["run", "updates", "median tokens/s (after step 10)", "loss, first 10", "loss, last 50",
         "held-out perplexity"], rows) + [""])


def write_comparison(job: ExperimentsJob, runs: list[Run]) -> str:
    """Write OUT/table.md, OUT/summary.json and OUT/comparison.png from the results in
    OUT; return the table."""
    results = load_results(job.out, runs)
    checks = compare(runs, results, ppl_tolerance=job.ppl_tolerance,
                     accuracy_tolerance=job.accuracy_tolerance,
                     control_floor=job.control_floor)
    table = comparison_table(runs, results, checks, ppl_tolerance=job.ppl_tolerance,
                             accuracy_tolerance=job.accuracy_tolerance)
    table = "\n".join(part for part in (table, depth_tables(runs, results),
                                         finetune_summary(job.out, runs)) if part)
    job.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(job.out / TABLE_FILE, table)
    summary = {"runs": {r.name: {"label": r.label, "attention": r.attention,
                                 "window": r.window, "finetuned": r.finetuned,
                                 "full_attention_layers": list(r.full_layers),
                                 "evaluated": r.name in results} for r in runs},
               "targets": checks, "ppl_tolerance": job.ppl_tolerance,
               "accuracy_tolerance": job.accuracy_tolerance,
               "control_floor": job.control_floor}
    atomic_write_text(job.out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    comparison_plot(runs, results, job.out / PLOT_FILE)
    return table


# ------------------------------------------------------------------------------ the job


class UsageError(ValueError):
    """A bad argument, found before anything runs."""


@dataclass(frozen=True, kw_only=True)
class ExperimentsJob:
    """One comparison. Each field is the command-line flag of the same name (`seq_len` is
    --seq-len, `finetune_args` --finetune-args); the command line takes its defaults from
    here. Checked when made (`UsageError` naming the flag): windows are made unique, lengths
    sorted and unique."""

    model: str | Path
    out: Path = Path("runs/quality")
    group_size: int = DEFAULT_CCA.group_size
    windows: tuple[int, ...] = (256, DEFAULT_CCA.window_size)
    hybrid_layers: tuple[int, ...] = ()  # a hybrid arm per window: full attention in these
    # fine-tuning (the same for every attention)
    steps: int = 500                    # updates per fine-tune
    seq_len: int = 8192
    batch_size: int = 8                 # the paper: 32
    grad_accum: int = 1
    lr: float = 2e-5                    # the paper's
    warmup_steps: int = 20
    eval_every: int = 100               # held-out perplexity during fine-tuning
    finetune_args: str = ""             # more flags for every fine-tune, e.g. "--data DIR"
    # evaluation
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    examples: int = 20                  # per (length, depth) cell of passkey and mdqa
    eval_args: str = ""                 # more flags for every evaluation
    ppl_tolerance: float = 0.03         # targets: see the module docstring
    accuracy_tolerance: float = 5.0
    control_floor: float = 90.0
    seed: int = 0
    skip_untrained: bool = False
    table_only: bool = False
    dry_run: bool = False
    time_limit: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "windows", tuple(dict.fromkeys(self.windows)))
        object.__setattr__(self, "lengths", tuple(sorted(set(self.lengths))))
        try:        # the range is checked by the fine-tune, which knows the layer count
            object.__setattr__(self, "hybrid_layers", check_layer_indices(
                self.hybrid_layers, name="--hybrid-layers"))
        except (TypeError, ValueError) as err:
            raise UsageError(str(err)) from None
        for name in ("group_size", "steps", "seq_len", "batch_size", "grad_accum", "examples",
                     "warmup_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(self, name)}")
        if self.eval_every < 0:
            raise UsageError(f"--eval-every must be >= 0, got {self.eval_every}")
        for name in ("windows", "lengths"):
            bad = [v for v in getattr(self, name) if v < 1]
            if bad or not getattr(self, name):
                raise UsageError(f"--{name} must be >= 1, got {bad or '(none)'}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"--lr must be a finite number > 0, got {self.lr}")
        if self.batch_size % self.grad_accum:
            raise UsageError(f"--batch-size {self.batch_size} must be a multiple of "
                             f"--grad-accum {self.grad_accum}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise UsageError(f"--time-limit must be > 0 seconds, got {self.time_limit}")
        for name in ("finetune_args", "eval_args"):
            try:
                shlex.split(getattr(self, name))
            except ValueError as err:
                raise UsageError(f"--{name.replace('_', '-')}: {err}") from None


def plan_steps(job: ExperimentsJob, runs: list[Run]) -> list[tuple[str, list[str], bool]]:
    """(name, command, already done) of every step, in the order they run: each fine-tune is
    evaluated as soon as it ends (the control first), so a run cut short still leaves
    complete pairs; the untouched model comes last."""
    steps = []
    for run in sorted(runs, key=lambda r: (not r.finetuned, r.attention != "full")):
        done = (job.out / "eval" / run.name / "results.json").is_file()
        if run.finetuned:
            # Not needed once its evaluation exists (its export may be gone by then).
            folder = finetune_dir(job.out, run)
            steps.append((folder.name, finetune_command(job, run),
                          done or (folder / "export").is_dir()))
        steps.append((f"eval-{run.name}", evaluate_command(job, run), done))
    return steps


def run(job: ExperimentsJob) -> str | None:
    """Run the steps not done yet, each a subprocess (`run_step`), rewriting the comparison
    after each; return the comparison table (None for a dry run, which prints the commands
    and runs nothing). Interrupted (signal or --time-limit) or StepFailed after writing the
    comparison of what is there; UsageError if the model is not a directory."""
    if not (job.table_only or job.dry_run) and not Path(job.model).is_dir():
        raise UsageError(f"--model: {str(job.model)!r} is not a directory")
    runs = plan_runs(list(job.windows), job.hybrid_layers)
    if job.skip_untrained:
        runs = [r for r in runs if r.finetuned]
    if not job.table_only:
        steps = plan_steps(job, runs)
        todo = [s for s in steps if not s[2]]
        print(f"{len(steps)} steps, {len(steps) - len(todo)} already done", flush=True)
        if job.dry_run:
            for name, cmd, done in steps:
                print(("# done: " if done else "") + _display(cmd))
            return None
        job.out.mkdir(parents=True, exist_ok=True)
        deadline = (time.monotonic() + job.time_limit) if job.time_limit else None
        handlers = {sig: signal.signal(sig, _request_stop)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for i, (name, cmd, _) in enumerate(todo, 1):
                print(f"\n=== step {i}/{len(todo)}: {name}", flush=True)
                run_step(cmd, job.out, name, deadline)
                write_comparison(job, runs)
        except (Interrupted, StepFailed):
            write_comparison(job, runs)
            raise
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            _STOP.clear()
    return write_comparison(job, runs)
