"""Fine-tune a model with CCA (each --windows value; with --hybrid-layers also a hybrid per
window) and with full attention by the same recipe, evaluate those and the model as it is (full, and CCA with no training), and write the
comparison (table.md, summary.json, comparison.png) into --out. Finished steps are skipped, so
a rerun continues an interrupted comparison.

`python -m train.experiments`, the command line of `train.experiments` (the paragraph above is
its --help description). `main(argv)` parses the flags into an `ExperimentsJob` (which checks
them) and runs it with `train.experiments.run`: each fine-tune and evaluation is a subprocess
of its own. Exit codes: 0 done (or --dry-run), 2 bad input, 1 a step failed, 3 stopped
(signal or --time-limit; the same command continues).
"""
import sys
from pathlib import Path

from cca_jax import command_line
from cca_jax.command_line import layer_indices_argument
from cca_jax.config import DEFAULT_CCA
from train import experiments



def build_parser():
    p = command_line.parser("train.experiments", __doc__, command_line.ALL_DEFAULTS,
                            experiments.ExperimentsJob)
    p.add_argument("--model", required=True, metavar="PATH",
                   help="pretrained model: converted cca_jax directory or Hugging Face "
                        "LLaMA/Qwen2 directory")
    p.add_argument("--out", type=Path,
                   help="where fine-tunes, evaluations, logs and the comparison go")
    p.add_argument("--group-size", type=int, help="CCA group size g (default: the paper's)")
    p.add_argument("--windows", type=int, nargs="+",
                   help="CCA local windows w to compare (default: the paper's "
                        f"{DEFAULT_CCA.window_size} and a quarter of it, to see what a "
                        "smaller window costs)")
    p.add_argument("--hybrid-layers", type=layer_indices_argument, metavar="I,J,...",
                   help="also a hybrid arm per window: CCA with full attention in these layers "
                        "(e.g. the top layers of python -m train.attention_reach)")
    g = p.add_argument_group("fine-tuning (the same for every attention)")
    g.add_argument("--steps", type=int, help="optimizer updates per fine-tune")
    g.add_argument("--seq-len", type=int, help="tokens per training sequence")
    g.add_argument("--batch-size", type=int, help="sequences per update (the paper: 32)")
    g.add_argument("--grad-accum", type=int,
                   help="micro-batches per update (divides --batch-size)")
    g.add_argument("--lr", type=float,
                   help="AdamW learning rate (the paper's), constant after the warm-up")
    g.add_argument("--warmup-steps", type=int, help="linear warm-up updates")
    g.add_argument("--eval-every", type=int,
                   help="held-out perplexity during fine-tuning every N updates")
    g.add_argument("--finetune-args",
                   help="extra arguments for python -m train.finetune, e.g. '--data a.txt' "
                        "(a value that is one option needs '=': --finetune-args=--no-export)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--lengths", type=int, nargs="+", help="evaluation context lengths in tokens")
    g.add_argument("--examples", type=int,
                   help="examples per (length, depth) cell of passkey and mdqa (x 5 depths: "
                        "100 per length)")
    g.add_argument("--eval-args",
                   help="extra arguments for python -m train.evaluate, e.g. '--ppl-tail 256' "
                        "(a value that is one option needs '=': --eval-args=--dtype=float32)")
    g.add_argument("--ppl-tolerance", type=float,
                   help="target: CCA perplexity at the longest length at most this fraction "
                        "above the fine-tuned full model's")
    g.add_argument("--accuracy-tolerance", type=float,
                   help="target: CCA ranking accuracy at most this many points below the "
                        "control at any length")
    g.add_argument("--control-floor", type=float,
                   help="the control is valid when its passkey ranking accuracy is at least "
                        "this at every length")
    p.add_argument("--seed", type=int, help="data order and example seed")
    p.add_argument("--skip-untrained", action="store_true",
                   help="evaluate only the fine-tuned models")
    p.add_argument("--table-only", action="store_true",
                   help="run nothing; rebuild the comparison from the results in --out")
    p.add_argument("--dry-run", action="store_true",
                   help="print the commands that would run, run nothing")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="stop after this long (the running fine-tune saves a checkpoint "
                        "first) and exit with code 3; the same command continues later. "
                        "SIGINT/SIGTERM do the same")
    return p


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        job = command_line.job_from(arguments, experiments.ExperimentsJob)
        table = experiments.run(job)
    except experiments.UsageError as err:
        return command_line.usage_error(err)
    except experiments.StepFailed as err:
        return command_line.usage_error(err, 1)
    except experiments.Interrupted as err:
        print(f"interrupted: {err}; run the same command again to continue", file=sys.stderr)
        return 3
    if table is None:           # --dry-run
        return 0
    print("\n" + table)
    print(f"wrote {job.out / experiments.TABLE_FILE}, {job.out / experiments.SUMMARY_FILE}, "
          f"{job.out / experiments.PLOT_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":      # python -m train.experiments.cli (same as train.experiments)
    sys.exit(main())
