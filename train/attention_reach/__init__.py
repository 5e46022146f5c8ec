"""Which layers' attention reaches furthest back: `run(ReachJob(...))`, or
`python -m train.attention_reach` (the command line, `train/attention_reach/cli.py`).

A hybrid model keeps full attention in a few layers (`--full-attention-layers`). A short
argument for which: the layers of the untouched model that put the most attention on keys
CCA would only see pooled. This tool runs the model with full attention over held-out text
(the evaluation's sources, `train.eval_tasks.heldout_documents`) and reports, per layer, the
*far share*: the attention probability on keys more than w positions back (key j of query i
with i - j > w), averaged over the queries that have such keys (i > w), over the heads and
over the text windows. It prints the table and the top-k layers as the flag's value:

    python -m train.attention_reach --model DIR --length 4096 --window 1024 --top 3
    ...
    --full-attention-layers 3,11,17

The probabilities are computed `--chunk` queries at a time (one [chunk, length] block of
scores per head), never as a [length, length] array; the layers run as in the model, one
jitted pass per window.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cca_jax.config import describe_layers
from cca_jax.io import atomic_write_text
from train.eval_tasks import PPL_SOURCES

DEFAULT_CHUNK = 512
DTYPES = ("auto", "float32", "bfloat16")   # auto: bfloat16 on a GPU, float32 elsewhere


class UsageError(ValueError):
    """A bad argument or input, found before the model is loaded."""


def far_share(q, k, window: int, chunk: int = DEFAULT_CHUNK):
    """Per query head, the mean over rows and queries i > window of the softmax attention
    probability (scale 1/sqrt(d), causal) on keys j < i - window.

    q [B, L, H, d] (after RoPE), k [B, L, Hkv, d] (GQA: H a multiple of Hkv). Returns
    float32 [H]; NaN when L <= window + 1 (no query has a far key). Queries are taken
    `chunk` at a time: the largest scores array is [B, H, chunk, L]."""
    import jax
    import jax.numpy as jnp

    B, L, H, d = q.shape
    Hkv = k.shape[2]
    if L <= window + 1:
        return jnp.full((H,), jnp.nan, jnp.float32)
    c = min(chunk, L)
    n = -(-L // c)
    qp = jnp.pad(q, ((0, 0), (0, n * c - L), (0, 0), (0, 0))).astype(jnp.float32)
    kf = jnp.repeat(k.astype(jnp.float32), H // Hkv, axis=2)        # [B, L, H, d]
    keys = jnp.arange(L)
    scale = 1.0 / math.sqrt(d)

    def block(index):
        first = index * c
        qb = jax.lax.dynamic_slice_in_dim(qp, first, c, axis=1)
        rows = first + jnp.arange(c)                                # query positions
        scores = jnp.einsum("bqhd,bkhd->bhqk", qb, kf,
                            precision=jax.lax.Precision.HIGHEST) * scale
        scores = jnp.where(keys[None, :] <= rows[:, None], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1)
        far = keys[None, :] < (rows - window)[:, None]              # [c, L]
        share = jnp.sum(jnp.where(far, probs, 0.0), axis=-1)      # [B, H, c]
        counted = (rows > window) & (rows < L)
        return jnp.sum(jnp.where(counted, share, 0.0), axis=(0, 2))  # [H]

    total = jax.lax.map(block, jnp.arange(n)).sum(axis=0)
    return total / (B * (L - window - 1))


def layer_far_shares(model, input_ids, window: int, chunk: int = DEFAULT_CHUNK):
    """float32 [layers, H]: `far_share` of every decoder layer of `model` (run as it is
    configured; the untouched model means attention="full") on input_ids [B, L]."""
    import jax.numpy as jnp

    x = model.embed_tokens(input_ids)
    shares = []
    for layer in model.layers:
        q, k, _ = layer.self_attn.project_qkv(layer.input_layernorm(x))
        shares.append(far_share(q, k, window, chunk))
        x = layer(x)
    return jnp.stack(shares)


def top_layers(shares, top: int) -> tuple[int, ...]:
    """The `top` layers with the largest far share (shares [layers], NaN never chosen),
    in increasing order (the flag's spelling)."""
    shares = np.nan_to_num(np.asarray(shares, np.float64), nan=-1.0)
    order = sorted(range(len(shares)), key=lambda i: (-shares[i], i))
    return tuple(sorted(order[:top]))


def text_windows(documents, length: int, count: int) -> list[tuple[str, np.ndarray]]:
    """Up to `count` windows of `length` tokens: (name, ids) from documents [(name, ids)],
    taken in turn from each document long enough (its first window, then its second, ...:
    non-overlapping), so that the windows spread over the documents."""
    per_doc = [[(f"{name}@{start}", ids[start:start + length])
                for start in range(0, len(ids) - length + 1, length)]
               for name, ids in documents]
    out = []
    for rank in range(max((len(w) for w in per_doc), default=0)):
        out.extend(w[rank] for w in per_doc if rank < len(w))
    return out[:count]


@dataclass(frozen=True, kw_only=True)
class ReachJob:
    """One measurement. Each field is the command-line flag of the same name; the command line
    takes its defaults from here. Checked when made (`UsageError` naming the flag)."""

    model: str | Path                   # converted cca_jax or Hugging Face directory
    tokenizer: str | Path | None = None  # default: the model directory
    length: int = 4096                  # tokens per text window
    window: int = 1024                  # "far": more than this many positions back
    top: int = 3                        # layers to suggest
    samples: int = 4                    # text windows to average over
    sources: tuple[str, ...] = PPL_SOURCES   # held-out corpora of train.evaluate
    files: tuple[str, ...] = ()         # extra held-out text files, one document each
    chunk: int = DEFAULT_CHUNK          # queries per block of attention probabilities
    dtype: str = "auto"                 # auto: bfloat16 on a GPU, float32 elsewhere
    json: str | Path | None = None      # also write the per-layer, per-head shares here

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(self.sources))
        object.__setattr__(self, "files", tuple(self.files))
        for name in ("length", "window", "top", "samples", "chunk"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.length <= self.window + 1:
            raise UsageError(f"--length {self.length} leaves no query more than --window "
                             f"{self.window} positions past a key; use --length > window + 1")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        unknown = [s for s in self.sources if s not in PPL_SOURCES]
        if unknown:
            raise UsageError(f"--sources: unknown {unknown}; choose from {list(PPL_SOURCES)}")
        model = Path(self.model).expanduser()
        if not model.is_dir():
            raise UsageError(f"--model: {str(model)!r} is not a directory")
        if not self.sources and not self.files:
            raise UsageError("no text: give --sources and/or --files")


def text_for(job: ReachJob) -> list[tuple[str, np.ndarray]]:
    """The job's text windows, read before any model is loaded: UsageError when --top exceeds
    the model's layers or no held-out document has --length tokens."""
    from cca_jax.loading import load_tokenizer, read_config
    from train.eval_tasks import heldout_documents

    layers = read_config(job.model).num_hidden_layers
    if job.top > layers:
        raise UsageError(f"--top {job.top} exceeds the model's {layers} layers")
    tokenizer = load_tokenizer(job.tokenizer or job.model)
    documents = [(doc.name, np.asarray(tokenizer.encode(doc.text, add_special_tokens=False),
                                       np.int32))
                 for doc in heldout_documents(list(job.sources), list(job.files))]
    windows = text_windows(documents, job.length, job.samples)
    if not windows:
        longest = max((len(ids) for _, ids in documents), default=0)
        raise UsageError(f"no held-out document has --length {job.length} tokens (the "
                         f"longest has {longest}); lower --length or add --files")
    return windows


def run(job: ReachJob, windows: list[tuple[str, np.ndarray]] | None = None) -> dict:
    """Measure: the report {"model", "length", "window", "windows", "dtype", "far_share"
    [layers], "far_share_per_head" [layers][H], "top"}, also written to `job.json` when set.
    `windows` from `text_for(job)` (read here when None). Progress goes to stderr."""
    if windows is None:
        windows = text_for(job)
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cca_jax.loading import from_pretrained

    err = sys.stderr
    dtype = job.dtype
    if dtype == "auto":
        dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    print(f"loading {job.model} ({dtype}, full attention) on {jax.default_backend()} ...",
          file=err, flush=True)
    model = from_pretrained(job.model, attention="full", dtype=dtype)
    graphdef, state = nnx.split(model)
    shares_of = jax.jit(lambda state, ids: layer_far_shares(
        nnx.merge(graphdef, state), ids, job.window, job.chunk))
    print(f"{len(windows)} window(s) of {job.length} tokens: "
          f"{', '.join(name for name, _ in windows)}", file=err, flush=True)
    per_window = [np.asarray(shares_of(state, jnp.asarray(ids[None])), np.float64)
                  for _, ids in windows]
    heads = np.mean(per_window, axis=0)                 # [layers, H]
    shares = heads.mean(axis=1)
    report = {"model": str(job.model), "length": job.length, "window": job.window,
              "windows": [name for name, _ in windows], "dtype": dtype,
              "far_share": shares.tolist(), "far_share_per_head": heads.tolist(),
              "top": list(top_layers(shares, job.top))}
    if job.json:
        atomic_write_text(Path(job.json), json.dumps(report, indent=2) + "\n")
    return report


def report_table(report: dict) -> str:
    """The per-layer table (mean, smallest and largest head; * marks the chosen layers), then
    the chosen layers as the value of --full-attention-layers (the last line)."""
    chosen, heads = report["top"], np.asarray(report["far_share_per_head"])
    lines = [f"attention on keys more than {report['window']} positions back (share of the "
             f"probability, queries past {report['window']}, {len(report['windows'])} "
             f"window(s) of {report['length']} tokens):",
             f"{'layer':>5}  {'mean':>6}  {'min head':>8}  {'max head':>8}"]
    for index, row in enumerate(heads):
        mark = "  *" if index in chosen else ""
        lines.append(f"{index:>5}  {row.mean():6.3f}  {row.min():8.3f}  {row.max():8.3f}{mark}")
    flag = describe_layers(chosen)
    lines += [f"the {len(chosen)} layer(s) reaching furthest: {flag}",
              f"--full-attention-layers {flag}"]
    return "\n".join(lines)
