"""`python -m train.experiments`: does CCA keep a model's quality? One command runs the comparison.

For one pretrained model it runs, in this order, each as its own subprocess whose command line
is logged to OUT/commands.sh:

1. fine-tunes (`python -m train.finetune`) of full attention (the fair control) and of CCA
   with group size g and each local window w, all by the same recipe, each followed at once
   by its evaluation (`python -m train.evaluate`);
2. evaluations of the model as it is: full attention, and CCA plugged in with no training;
3. the comparison: OUT/table.md (perplexity, passkey and multi-document QA per length, and
   the targets: CCA's perplexity at the longest length within --ppl-tolerance of the
   fine-tuned full model's, its accuracies not more than --accuracy-tolerance points below at
   any length), OUT/summary.json and OUT/comparison.png.

A step whose output already exists (OUT/eval/<run>/results.json for an evaluation; for a
fine-tune its export, OUT/finetune-*/export, or its evaluation's results) is skipped, so an
interrupted comparison continues where it stopped; `--table-only` rebuilds the comparison
from what is there.

    python -m train.experiments --model models/smollm2-135m-instruct --out runs/quality \
        --steps 500 --seq-len 8192 --windows 256 1024 --lengths 1024 2048 4096 8192
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from convert.io import atomic_write_text
from train.evaluate import length_axis, save_figure

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


def plan_runs(windows: list[int]) -> list[Run]:
    """Evaluated models, fine-tuned first (the comparison's core), then the untouched model."""
    runs = [Run(f"cca-w{w}-ft", f"CCA w={w}, fine-tuned", "cca", w, True) for w in windows]
    runs.append(Run("full-ft", "full, fine-tuned", "full", None, True))
    runs.append(Run("full", "full, as is", "full", None, False))
    runs += [Run(f"cca-w{w}", f"CCA w={w}, no training", "cca", w, False) for w in windows]
    return runs


def finetune_dir(out: Path, attention: str, window: int | None) -> Path:
    return out / ("finetune-full" if attention == "full" else f"finetune-cca-w{window}")


def finetune_command(args, attention: str, window: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "train.finetune", "--model", str(args.model),
           "--attention", attention]
    if attention == "cca":
        cmd += ["--group-size", str(args.group_size), "--window-size", str(window)]
    cmd += ["--seq-len", str(args.seq_len), "--steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--warmup-steps", str(args.warmup_steps), "--eval-every", str(args.eval_every),
            "--seed", str(args.seed), "--out", str(finetune_dir(args.out, attention, window)),
            "--overwrite"]
    return cmd + shlex.split(args.finetune_args)


def evaluate_command(args, run: Run) -> list[str]:
    model = (finetune_dir(args.out, run.attention, run.window) / "export" if run.finetuned
             else Path(args.model))
    cmd = [sys.executable, "-m", "train.evaluate", "--model", str(model),
           "--attention", run.attention]
    if run.attention == "cca":
        cmd += ["--group-size", str(args.group_size), "--window-size", str(run.window)]
    cmd += ["--lengths", *map(str, args.lengths), "--examples", str(args.examples),
            "--seed", str(args.seed), "--label", run.label,
            "--out", str(args.out / "eval" / run.name), "--no-progress"]
    return cmd + shlex.split(args.eval_args)


def _display(cmd: list[str]) -> str:
    """The command as a user would type it (`python` for this interpreter)."""
    return shlex.join(["python" if cmd[0] == sys.executable else cmd[0]] + cmd[1:])


def run_step(cmd: list[str], out: Path, log_name: str) -> None:
    """Run `cmd`, teeing its output to OUT/logs/<log_name>.log; raise if it fails."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    with open(out / COMMANDS_FILE, "a") as f:
        f.write(f"# {datetime.datetime.now().isoformat(timespec='seconds')}\n{_display(cmd)}\n")
    print(f"\n$ {_display(cmd)}", flush=True)
    start = time.perf_counter()
    with open(out / "logs" / f"{log_name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        code = proc.wait()
    print(f"[{log_name}: exit {code} after {time.perf_counter() - start:.0f} s]", flush=True)
    if code != 0:
        raise RuntimeError(f"step {log_name} failed with exit code {code}; see "
                           f"{out / 'logs' / (log_name + '.log')}")


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


def compare(runs: list[Run], results: dict[str, dict], *, ppl_tolerance: float,
            accuracy_tolerance: float) -> dict:
    """Targets of each fine-tuned CCA run against the fine-tuned full-attention run."""
    control = results.get("full-ft")
    checks = {}
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
        p_ours, p_full = _ppl_at(ours, longest), _ppl_at(control, longest)
        if p_ours is not None and p_full is not None:
            ratio = p_ours / p_full
            check["ppl"] = {"cca": p_ours, "full": p_full, "excess_percent": 100 * (ratio - 1),
                            "met": ratio <= 1 + ppl_tolerance}
        for task in TASKS:
            gaps = {}
            for L in lengths:
                a, b = _acc_at(ours, task, L), _acc_at(control, task, L)
                if a is not None and b is not None:
                    gaps[str(L)] = a - b
            if gaps:
                worst = min(gaps, key=gaps.get)
                check[task] = {"gap_points_by_length": gaps, "worst_length": int(worst),
                               "worst_gap_points": gaps[worst],
                               "met": gaps[worst] >= -accuracy_tolerance}
        check["met"] = all(v["met"] for k, v in check.items() if isinstance(v, dict))
        checks[run.name] = check
    return checks


def _cell(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] *
                                                             (len(header) - 1)) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows])


def comparison_table(runs: list[Run], results: dict[str, dict], checks: dict, *,
                     ppl_tolerance: float, accuracy_tolerance: float) -> str:
    """Markdown: one table per measure (rows: runs, columns: lengths), then the targets."""
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
        lines += [f"{task} accuracy (%), {n} examples x {depths} depths per length", ""]
        lines += _md_table(["model"] + [str(L) for L in lengths],
                           [[r.label] + [_cell(_acc_at(results[r.name], task, L), 1)
                                         for L in lengths] for r in present])
        lines.append("")
    if checks:
        lines += [f"Targets against full attention after the same fine-tuning: perplexity at "
                  f"the longest length within {100 * ppl_tolerance:g}%, accuracies not more "
                  f"than {accuracy_tolerance:g} points below at any length", ""]
        rows = []
        for name, check in checks.items():
            if "error" in check:
                rows.append([name, check["error"], "", "", ""])
                continue
            row = [check["label"]]
            p = check.get("ppl")
            row.append(f"{p['excess_percent']:+.1f}% ({'met' if p['met'] else 'missed'})"
                       if p else "-")
            for task in TASKS:
                t = check.get(task)
                row.append(f"{t['worst_gap_points']:+.1f} at {t['worst_length']} "
                           f"({'met' if t['met'] else 'missed'})" if t else "-")
            row.append("yes" if check["met"] else "no")
            rows.append(row)
        lines += _md_table(["CCA run", f"ppl vs full", "passkey: worst gap",
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


def write_comparison(args, runs: list[Run]) -> str:
    results = load_results(args.out, runs)
    checks = compare(runs, results, ppl_tolerance=args.ppl_tolerance,
                     accuracy_tolerance=args.accuracy_tolerance)
    table = comparison_table(runs, results, checks, ppl_tolerance=args.ppl_tolerance,
                             accuracy_tolerance=args.accuracy_tolerance)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / TABLE_FILE, table)
    summary = {"runs": {r.name: {"label": r.label, "attention": r.attention,
                                 "window": r.window, "finetuned": r.finetuned,
                                 "evaluated": r.name in results} for r in runs},
               "targets": checks, "ppl_tolerance": args.ppl_tolerance,
               "accuracy_tolerance": args.accuracy_tolerance}
    atomic_write_text(args.out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    comparison_plot(runs, results, args.out / PLOT_FILE)
    return table


# ------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.experiments",
        description="Fine-tune a model with CCA (each --windows value) and with full "
                    "attention by the same recipe, evaluate those and the model as it is "
                    "(full, and CCA with no training), and write the comparison "
                    "(table.md, summary.json, comparison.png) into --out. Finished steps "
                    "are skipped, so a rerun continues an interrupted comparison.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, metavar="PATH",
                   help="pretrained model: converted cca_jax directory or Hugging Face "
                        "LLaMA/Qwen2 directory")
    p.add_argument("--out", type=Path, default=Path("runs/quality"),
                   help="where fine-tunes, evaluations, logs and the comparison go")
    p.add_argument("--group-size", type=int, default=16, help="CCA group size g")
    p.add_argument("--windows", type=int, nargs="+", default=[256, 1024],
                   help="CCA local windows w to compare")
    g = p.add_argument_group("fine-tuning (the same for every attention)")
    g.add_argument("--steps", type=int, default=500, help="optimizer updates per fine-tune")
    g.add_argument("--seq-len", type=int, default=8192, help="tokens per training sequence")
    g.add_argument("--batch-size", type=int, default=1, help="sequences per update")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    g.add_argument("--warmup-steps", type=int, default=25, help="linear warm-up updates")
    g.add_argument("--eval-every", type=int, default=100,
                   help="held-out perplexity during fine-tuning every N updates")
    g.add_argument("--finetune-args", default="",
                   help="extra arguments for python -m train.finetune, e.g. '--data a.txt' "
                        "(a value that is one option needs '=': --finetune-args=--no-export)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                   help="evaluation context lengths in tokens")
    g.add_argument("--examples", type=int, default=20,
                   help="examples per (length, depth) cell of passkey and mdqa")
    g.add_argument("--eval-args", default="",
                   help="extra arguments for python -m train.evaluate, e.g. '--ppl-tail 256' "
                        "(a value that is one option needs '=': --eval-args=--dtype=float32)")
    g.add_argument("--ppl-tolerance", type=float, default=0.03,
                   help="target: CCA perplexity at the longest length at most this fraction "
                        "above the fine-tuned full model's")
    g.add_argument("--accuracy-tolerance", type=float, default=2.0,
                   help="target: CCA accuracy at most this many points below at any length")
    p.add_argument("--seed", type=int, default=0, help="data order and example seed")
    p.add_argument("--skip-untrained", action="store_true",
                   help="evaluate only the fine-tuned models")
    p.add_argument("--table-only", action="store_true",
                   help="run nothing; rebuild the comparison from the results in --out")
    p.add_argument("--dry-run", action="store_true",
                   help="print the commands that would run, run nothing")
    return p


def check_args(args) -> None:
    for name in ("group_size", "steps", "seq_len", "batch_size", "examples", "warmup_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_every < 0:
        raise ValueError(f"--eval-every must be >= 0, got {args.eval_every}")
    for name in ("windows", "lengths"):
        bad = [v for v in getattr(args, name) if v < 1]
        if bad:
            raise ValueError(f"--{name} must be >= 1, got {bad}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if not (args.table_only or args.dry_run) and not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model: {str(args.model)!r} is not a directory")
    for name in ("finetune_args", "eval_args"):
        try:
            shlex.split(getattr(args, name))
        except ValueError as err:
            raise ValueError(f"--{name.replace('_', '-')}: {err}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.windows = list(dict.fromkeys(args.windows))
    args.lengths = sorted(set(args.lengths))
    try:
        check_args(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs = plan_runs(args.windows)
    if args.skip_untrained:
        runs = [r for r in runs if r.finetuned]
    if not args.table_only:
        # Each fine-tune is evaluated as soon as it ends (the control first), so a run cut
        # short still leaves complete pairs; the untouched model comes last.
        steps = []
        for run in sorted(runs, key=lambda r: (not r.finetuned, r.attention != "full")):
            done = (args.out / "eval" / run.name / "results.json").is_file()
            if run.finetuned:
                # Not needed once its evaluation exists (its export may be gone by then).
                folder = finetune_dir(args.out, run.attention, run.window)
                steps.append((folder.name, finetune_command(args, run.attention, run.window),
                              done or (folder / "export").is_dir()))
            steps.append((f"eval-{run.name}", evaluate_command(args, run), done))
        todo = [s for s in steps if not s[2]]
        print(f"{len(steps)} steps, {len(steps) - len(todo)} already done", flush=True)
        if args.dry_run:
            for name, cmd, done in steps:
                print(("# done: " if done else "") + _display(cmd))
            return 0
        args.out.mkdir(parents=True, exist_ok=True)
        for i, (name, cmd, _) in enumerate(todo, 1):
            print(f"\n=== step {i}/{len(todo)}: {name}", flush=True)
            try:
                run_step(cmd, args.out, name)
            except RuntimeError as err:
                print(f"error: {err}", file=sys.stderr)
                write_comparison(args, runs)
                return 1
            write_comparison(args, runs)
    table = write_comparison(args, runs)
    print("\n" + table)
    print(f"wrote {args.out / TABLE_FILE}, {args.out / SUMMARY_FILE}, {args.out / PLOT_FILE}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
