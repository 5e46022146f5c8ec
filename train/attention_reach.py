"""`python -m train.attention_reach`: which layers' attention reaches furthest back.

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

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from train.eval_tasks import PPL_SOURCES

DEFAULT_CHUNK = 512


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.attention_reach",
        description="Per layer, the share of full attention's probability on keys more than "
                    "--window positions back (averaged over heads and over the queries that "
                    "have such keys), on held-out text; then the --top layers as the value "
                    "of --full-attention-layers (train.finetune, train.evaluate, "
                    "cca_jax.generate).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, metavar="PATH",
                   help="converted cca_jax or Hugging Face directory (run with full attention)")
    p.add_argument("--tokenizer", metavar="PATH", default=None,
                   help="tokenizer directory (default: the model directory)")
    p.add_argument("--length", type=int, default=4096, help="tokens per text window")
    p.add_argument("--window", type=int, default=1024, metavar="W",
                   help="'far' means more than W positions back (CCA's local window)")
    p.add_argument("--top", type=int, default=3, metavar="K", help="layers to suggest")
    p.add_argument("--samples", type=int, default=4, metavar="N",
                   help="text windows to average over (spread over the documents)")
    p.add_argument("--sources", nargs="*", choices=PPL_SOURCES, default=list(PPL_SOURCES),
                   help="held-out corpora of train.evaluate")
    p.add_argument("--files", nargs="*", default=[], metavar="FILE",
                   help="extra held-out text files, one document each")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK,
                   help="queries per block of attention probabilities")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype (auto: bfloat16 on a GPU, float32 elsewhere)")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="also write the per-layer, per-head shares here")
    return p


def check_args(args) -> None:
    for name in ("length", "window", "top", "samples", "chunk"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.length <= args.window + 1:
        raise UsageError(f"--length {args.length} leaves no query more than --window "
                         f"{args.window} positions past a key; use --length > window + 1")
    model = Path(args.model).expanduser()
    if not model.is_dir():
        raise UsageError(f"--model: {str(model)!r} is not a directory")
    if not args.sources and not args.files:
        raise UsageError("no text: give --sources and/or --files")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    err = sys.stderr
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        check_args(args)
        from cca_jax.loading import load_tokenizer, read_config
        from train.eval_tasks import heldout_documents

        layers = read_config(args.model).num_hidden_layers
        if args.top > layers:
            raise UsageError(f"--top {args.top} exceeds the model's {layers} layers")
        tokenizer = load_tokenizer(args.tokenizer or args.model)
        documents = [(doc.name, np.asarray(tokenizer.encode(doc.text, add_special_tokens=False),
                                           np.int32))
                     for doc in heldout_documents(args.sources, args.files)]
        windows = text_windows(documents, args.length, args.samples)
        if not windows:
            longest = max((len(ids) for _, ids in documents), default=0)
            raise UsageError(f"no held-out document has --length {args.length} tokens (the "
                             f"longest has {longest}); lower --length or add --files")
    except (ValueError, FileNotFoundError, NotADirectoryError, ModuleNotFoundError,
            OSError) as error:
        print(f"error: {error}", file=err)
        return 2

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cca_jax.loading import from_pretrained

    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    print(f"loading {args.model} ({dtype}, full attention) on {jax.default_backend()} ...",
          file=err, flush=True)
    model = from_pretrained(args.model, attention="full", dtype=dtype)
    graphdef, state = nnx.split(model)
    shares_of = jax.jit(lambda state, ids: layer_far_shares(
        nnx.merge(graphdef, state), ids, args.window, args.chunk))
    print(f"{len(windows)} window(s) of {args.length} tokens: "
          f"{', '.join(name for name, _ in windows)}", file=err, flush=True)
    per_window = [np.asarray(shares_of(state, jnp.asarray(ids[None])), np.float64)
                  for _, ids in windows]
    heads = np.mean(per_window, axis=0)                 # [layers, H]
    shares = heads.mean(axis=1)
    chosen = top_layers(shares, args.top)

    print(f"attention on keys more than {args.window} positions back (share of the "
          f"probability, queries past {args.window}, {len(windows)} window(s) of "
          f"{args.length} tokens):")
    print(f"{'layer':>5}  {'mean':>6}  {'min head':>8}  {'max head':>8}")
    for index, row in enumerate(heads):
        mark = "  *" if index in chosen else ""
        print(f"{index:>5}  {row.mean():6.3f}  {row.min():8.3f}  {row.max():8.3f}{mark}")
    flag = ",".join(map(str, chosen))
    print(f"the {args.top} layer(s) reaching furthest: {flag}")
    print(f"--full-attention-layers {flag}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": str(args.model), "length": args.length, "window": args.window,
            "windows": [name for name, _ in windows], "dtype": dtype,
            "far_share": shares.tolist(), "far_share_per_head": heads.tolist(),
            "top": list(chosen)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
