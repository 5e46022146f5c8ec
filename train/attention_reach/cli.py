"""Per layer, the share of full attention's probability on keys more than --window positions
back (averaged over heads and over the queries that have such keys), on held-out text; then
the --top layers as the value of --full-attention-layers (train.finetune, train.evaluate,
cca_jax.generate).

`python -m train.attention_reach`, the command line of `train.attention_reach` (the paragraph
above is its --help description). `main(argv)` parses the flags into a `ReachJob` (which checks
them), reads the text (`text_for`) and measures (`run`); it prints the table, the last line
being the flag. Exit codes: 0 done, 2 bad input (`error:` on stderr, before the model loads).
"""
import os
import sys

from cca_jax import command_line
from train import attention_reach
from train.eval_tasks import PPL_SOURCES


def build_parser():
    p = command_line.parser("train.attention_reach", __doc__, command_line.ALL_DEFAULTS,
                            attention_reach.ReachJob)
    p.add_argument("--model", required=True, metavar="PATH",
                   help="converted cca_jax or Hugging Face directory (run with full attention)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer directory (default: the model directory)")
    p.add_argument("--length", type=int, help="tokens per text window")
    p.add_argument("--window", type=int, metavar="W",
                   help="'far' means more than W positions back (CCA's local window)")
    p.add_argument("--top", type=int, metavar="K", help="layers to suggest")
    p.add_argument("--samples", type=int, metavar="N",
                   help="text windows to average over (spread over the documents)")
    p.add_argument("--sources", nargs="*", choices=PPL_SOURCES,
                   help="held-out corpora of train.evaluate")
    p.add_argument("--files", nargs="*", metavar="FILE",
                   help="extra held-out text files, one document each")
    p.add_argument("--chunk", type=int, help="queries per block of attention probabilities")
    p.add_argument("--dtype", choices=attention_reach.DTYPES,
                   help="compute dtype (auto: bfloat16 on a GPU, float32 elsewhere)")
    p.add_argument("--json", metavar="FILE", help="also write the per-layer, per-head shares here")
    return p


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        job = command_line.job_from(arguments, attention_reach.ReachJob)
        windows = attention_reach.text_for(job)
    except (ValueError, FileNotFoundError, NotADirectoryError, ModuleNotFoundError,
            OSError) as error:
        return command_line.usage_error(error)
    print(attention_reach.report_table(attention_reach.run(job, windows)))
    return 0


if __name__ == "__main__":      # python -m train.attention_reach.cli
    sys.exit(main())
