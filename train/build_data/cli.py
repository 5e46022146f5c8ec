"""Build offline long-context training data (code of this Python installation, prose,
synthetic retrieval documents), mixed by token share and packed into training sequences, with
a manifest of every source and its split. `python -m train.finetune --data OUT` reads it.

`python -m train.build_data`, the command line of `train.build_data` (the paragraph above is
its --help description). `main(argv)` parses the flags into a `BuildDataJob` (which checks
them; --tokens and --mix are read with `parse_count` and `parse_mix`), builds it with
`train.build_data.run` and prints a summary. Bad input: `error: ...` on stderr and exit code
2, before any work.
"""
import sys

from cca_jax import command_line
from train import build_data



def build_parser():
    p = command_line.parser("train.build_data", __doc__, command_line.ALL_DEFAULTS,
                            build_data.BuildDataJob)
    p.add_argument("--tokenizer", required=True, metavar="DIR",
                   help="model or tokenizer directory whose tokenizer the fine-tune uses")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--tokens", default=build_data.DEFAULT_TOKENS,
                   help="training tokens to build (e.g. 82M, 500K); rounded up to whole "
                        "sequences")
    p.add_argument("--seq-len", type=int,
                   help="training sequence length (each stored row has one more token)")
    p.add_argument("--mix",
                   default=",".join(f"{k}={v:g}" for k, v in build_data.DEFAULT_MIX.items()),
                   help="token share of each kind: code, prose, retrieval")
    p.add_argument("--seed", type=int, help="seed of every choice")
    p.add_argument("--heldout-sequences", type=int,
                   help="held-out sequences (half code, half prose) for the fine-tune's "
                        "held-out perplexity")
    p.add_argument("--prose-files", nargs="*", metavar="FILE",
                   help="more prose (UTF-8 text files, one document each) for training")
    p.add_argument("--workers", type=int,
                   help="processes that build the synthetic documents (the result does not "
                        "depend on it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        job = command_line.job_from(
            arguments, build_data.BuildDataJob, tokens=build_data.parse_count(arguments.tokens),
            mix=build_data.parse_mix(arguments.mix),
            command=command_line.command_line("train.build_data", argv))
        manifest = build_data.run(job)
    except (build_data.UsageError, FileNotFoundError, ModuleNotFoundError) as err:
        return command_line.usage_error(err)
    built = manifest["mix_built"]
    print(f"{manifest['train_sequences']} training sequences of {manifest['seq_len']} tokens "
          f"({sum(manifest['tokens'].values()):,} tokens): "
          + ", ".join(f"{k} {100 * built[k]:.1f}%" for k in build_data.KINDS)
          + f"; {manifest['heldout_sequences']} held-out sequences; "
          f"{manifest['seconds']} s -> {job.out}")
    return 0


if __name__ == "__main__":      # python -m train.build_data.cli (same as train.build_data)
    sys.exit(main())
