"""Measure long-context quality of a model with CCA or full attention: held-out perplexity on
the last tokens of windows of each length, passkey retrieval and synthetic multi-document QA
(the true value ranked first among candidates by the model's likelihood, with 95%% intervals;
greedy exact match too), and copying renamed identifiers of held-out code, at each length
(and depth). Prints a table and writes results.json and PNG plots into --out.

`python -m train.evaluate`, the command line of `train.evaluate` (the paragraph above is its
--help description). `main(argv)` parses the flags into an `EvaluateJob` (which checks them),
runs it with `train.evaluate.run`, and prints the table of the results. Bad input: `error:
...` on stderr and exit code 2, before the model is loaded.
"""
import sys

from cca_jax import command_line
from cca_jax.command_line import layer_indices_argument
from cca_jax.config import DEFAULT_CCA
from train import evaluate
from train.corpora import KJV_HELDOUT_BOOKS



def build_parser():
    p = command_line.parser("train.evaluate", __doc__, command_line.DefaultsHelpFormatter,
                            evaluate.EvaluateJob)
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, metavar="PATH",
                   help="converted cca_jax directory (python -m cca_jax.convert, or "
                        "train.finetune's export) or Hugging Face LLaMA/Qwen2 directory")
    g.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer directory (default: the model directory)")
    g.add_argument("--attention", choices=evaluate.ATTENTIONS,
                   help="attention to evaluate with (default: what the model directory's "
                        "cca_config.json says, e.g. a train.finetune export; full for a "
                        "Hugging Face directory)")
    g.add_argument("--group-size", type=int, metavar="G",
                   help="CCA group size g (default: the model directory's, else the "
                        f"paper's {DEFAULT_CCA.group_size})")
    g.add_argument("--window-size", type=int, metavar="W",
                   help="CCA local window w (default: the model directory's, else the "
                        f"paper's {DEFAULT_CCA.window_size})")
    g.add_argument("--full-attention-layers", type=layer_indices_argument, metavar="I,J",
                   help="hybrid: these layers (from 0) use full attention, the rest CCA; "
                        "'none' for no layer (default: the model directory's, e.g. a "
                        "train.finetune export's)")
    g.add_argument("--attention-implementation",
                   choices=evaluate.IMPLEMENTATIONS,
                   help="attention op implementation (auto: Pallas on a GPU, XLA elsewhere)")
    g.add_argument("--rope-theta", type=float, metavar="T",
                   help="replace the model's RoPE base (stretches the context when larger)")
    g.add_argument("--rope-scaling", metavar="TYPE:FACTOR|JSON",
                   help="RoPE scaling for lengths beyond the model's context: 'linear:2', "
                        "'dynamic:2', a JSON dict, or 'none' to remove the model's scaling")
    g.add_argument("--dtype", choices=evaluate.DTYPES,
                   help="compute dtype (auto: bfloat16 on a GPU, float32 elsewhere)")
    g = p.add_argument_group("what to measure")
    g.add_argument("--lengths", type=int, nargs="+", required=True, metavar="L",
                   help="context lengths in tokens, e.g. 1024 2048 4096 8192")
    g.add_argument("--tasks", nargs="+", choices=evaluate.TASKS, help="measurements to run")
    g.add_argument("--depths", type=float, nargs="+",
                   metavar="PCT", help="where the answer sits, in percent of the context "
                                       "(passkey, mdqa)")
    g.add_argument("--examples", type=int, metavar="N",
                   help="examples per (length, depth) cell (passkey, mdqa); with the 5 "
                        "default depths, 100 per length")
    g.add_argument("--candidates", type=int,
                   metavar="K", help="the answer and K - 1 distractors ranked per example "
                                     "(passkey: random keys; mdqa: other facts' values)")
    g.add_argument("--seed", type=int, metavar="S", help="seed of the generated examples")
    g.add_argument("--answer-mode", choices=evaluate.ANSWER_MODES,
                   help="where the greedy prediction (exact-match column) comes from: forced, "
                        "the argmaxes of the candidate-scoring pass; generate, cached greedy "
                        "decoding (cca_jax.generate), one example at a time")
    g.add_argument("--decode-implementation", choices=evaluate.DECODE_IMPLEMENTATIONS,
                   help="decode attention of the candidate scoring (auto: "
                                        "the Pallas kernel on a GPU)")
    g.add_argument("--batch-size", type=int, metavar="B", help="sequences per forward pass")
    g = p.add_argument_group("perplexity")
    g.add_argument("--ppl-sources", nargs="*", choices=evaluate.tasks_lib.PPL_SOURCES,
                   help="held-out corpora: plays (train.corpora.HELD_OUT_PLAYS), kjv (books "
                        f"{', '.join(KJV_HELDOUT_BOOKS)})")
    g.add_argument("--ppl-files", nargs="*", metavar="FILE",
                   help="extra held-out text files, one document each (source 'file')")
    g.add_argument("--ppl-windows", type=int, metavar="N",
                   help="windows per document (the same window ends at every length)")
    g.add_argument("--ppl-tail", type=int, metavar="N",
                   help=f"perplexity is reported on the last N tokens of each window, at "
                        f"every length (default: {evaluate.DEFAULT_TAIL}, or a quarter of the "
                        "smallest length if that is less)")
    g = p.add_argument_group("copying renamed code")
    g.add_argument("--copy-docs", type=int, metavar="N",
                   help="renamed files of the held-out standard-library packages")
    g.add_argument("--copy-windows", type=int, metavar="N",
                   help="windows per file (the same ends at every length)")
    g.add_argument("--copy-tail", type=int, metavar="N",
                   help="score the copying targets among the last N tokens of each window "
                        "(default: half the smallest length)")
    g.add_argument("--copy-far", type=int, metavar="N",
                   help="'far' copies: previous occurrence more than N tokens back")
    g = p.add_argument_group("multi-document QA")
    g.add_argument("--mdqa-doc-tokens", type=int, metavar="N",
                   help="context tokens per document: k = max(2, round(length / N)) documents")
    g.add_argument("--mdqa-facts", type=int, metavar="N", help="code facts per document")
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR",
                   help="output directory (default: evals/<model>-<attention settings>)")
    g.add_argument("--label",
                   help="name of this run in the table, JSON and plots (default: from the "
                        "model and attention settings)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p



def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        job = command_line.job_from(arguments, evaluate.EvaluateJob,
                                    command=command_line.command_line("train.evaluate", argv))
        result = evaluate.run(job)
    except evaluate.UsageError as err:
        return command_line.usage_error(err)
    print(evaluate.format_table(result.results))
    print(f"wrote {result.out / evaluate.RESULTS_FILE} and "
          f"{', '.join(p.name for p in result.plots)}", file=sys.stderr)
    return 0


if __name__ == "__main__":      # python -m train.evaluate.cli (same as train.evaluate)
    sys.exit(main())
