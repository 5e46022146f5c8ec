"""The Pallas kernels on context-parallel shards against the whole-sequence kernels, on one GPU.

    python -m benchmarks.bench_context_kernel [--length 131072] [--shards 8] [--kv-heads 8]
        [--dtype bfloat16] [--json FILE] [--interpret --length 512 --shards 4 ...]

What cca_jax.context runs per device, without the collectives: the sequence (B = 1, H = 32,
d = 128, g = 16, w = 1024) cut into `--shards` contiguous shards; shard s calls
`cca_attention_pallas` on its queries, [halo of halo_length(g, w) keys (zeros before 0) ;
its own keys] and all core tokens, with `query_offset` a traced int32 (one compiled program
for every shard, as inside shard_map). For each shard, and for the whole sequence once:

- equality: the shard's output and dq against the whole-sequence kernel's rows (the same
  blocks in the same order: expected bit for bit where both get the same tiles, i.e. shards
  longer than cca_common.SHORT_FORWARD_LENGTH); its dk / dv scattered back to global rows
  (halo rows onto the shards before it, as the ppermute's transpose does) and summed over
  shards against the whole sequence's dk / dv (sums in another order: rounding only);
- time: forward and forward + backward (median ms), per shard, their sum and maximum,
  against the whole sequence.

Prediction (cca_kernels/NOTES.md, "Context parallelism"): a shard visits exactly the blocks
the whole-sequence kernels visit for its rows, so the shards' summed time is the whole
sequence's within a few % (the dk/dv grid's halo blocks and the dcore grid's empty core
blocks are extra programs with empty loops), and the last shard, which holds the most core
work, sets the pace of a context-parallel step.
"""
from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench import median_ms
from cca_jax.context import halo_length
from cca_jax.reference import pool_core_tokens
from cca_kernels.cca_attention import cca_attention_pallas

H, D, G, W = 32, 128, 16, 1024


def _rel(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_context_kernel",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--heads", type=int, default=H)
    parser.add_argument("--head-dim", type=int, default=D)
    parser.add_argument("--group-size", type=int, default=G)
    parser.add_argument("--window-size", type=int, default=W)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--interpret", action="store_true", help="CPU check of the script")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if not args.interpret and jax.default_backend() != "gpu":
        parser.error("needs a GPU (or --interpret with small sizes)")
    L, n, g, w = args.length, args.shards, args.group_size, args.window_size
    Ls = L // n
    if L % n or Ls % g:
        parser.error("--length must split into --shards shards of whole groups")
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (1, L, args.heads, args.head_dim), dtype)
    k = jax.random.normal(keys[1], (1, L, args.kv_heads, args.head_dim), dtype)
    v = jax.random.normal(keys[2], (1, L, args.kv_heads, args.head_dim), dtype)
    dout = jax.random.normal(keys[3], q.shape, dtype)
    scale = args.head_dim ** -0.5
    core_k, core_v = pool_core_tokens(q, k, v, group_size=g, scale=scale, num_groups=L // g)
    core_k, core_v = core_k.astype(dtype), core_v.astype(dtype)
    halo = halo_length(g, w)

    def kernel(q, k, v, ck, cv, offset):
        return cca_attention_pallas(q, k, v, ck, cv, group_size=g, window_size=w, scale=scale,
                                    interpret=args.interpret, query_offset=offset)

    def fwd_bwd(q, k, v, ck, cv, dout, offset):
        out, vjp = jax.vjp(lambda *a: kernel(*a, offset), q, k, v, ck, cv)
        return (out, *vjp(dout))

    forward, forward_backward = jax.jit(kernel), jax.jit(fwd_bwd)
    # The whole sequence: offset 0 as an int, the kernels' original code.
    whole_fwd = jax.jit(lambda *a: kernel(*a, 0))
    whole_fb = jax.jit(lambda *a: fwd_bwd(*a, 0))
    whole = whole_fb(q, k, v, core_k, core_v, dout)
    result = {"length": L, "shards": n, "heads": args.heads, "kv_heads": args.kv_heads,
              "head_dim": args.head_dim, "g": g, "w": w, "dtype": args.dtype, "halo": halo,
              "whole_fwd_ms": median_ms(whole_fwd, q, k, v, core_k, core_v,
                                        repeats=args.repeats),
              "whole_fwd_bwd_ms": median_ms(whole_fb, q, k, v, core_k, core_v, dout,
                                            repeats=args.repeats),
              "shards_detail": []}
    pad = jnp.zeros((1, halo, *k.shape[2:]), dtype)
    k_ext, v_ext = jnp.concatenate([pad, k], axis=1), jnp.concatenate([pad, v], axis=1)
    dk_sum = jnp.zeros(k_ext.shape, jnp.float32)
    dv_sum = jnp.zeros(v_ext.shape, jnp.float32)
    dck_sum = jnp.zeros(core_k.shape, jnp.float32)
    for s in range(n):
        rows = slice(s * Ls, (s + 1) * Ls)
        ext = slice(s * Ls, s * Ls + halo + Ls)   # rows of k_ext: [halo ; own]
        shard_args = (q[:, rows], k_ext[:, ext], v_ext[:, ext], core_k, core_v)
        offset = jnp.int32(s * Ls)
        out, dq, dk, dv, dck, _ = forward_backward(*shard_args, dout[:, rows], offset)
        dk_sum = dk_sum.at[:, ext].add(dk.astype(jnp.float32))
        dv_sum = dv_sum.at[:, ext].add(dv.astype(jnp.float32))
        dck_sum = dck_sum + dck.astype(jnp.float32)
        detail = {"shard": s,
                  "out_bitwise": bool(jnp.array_equal(out, whole[0][:, rows])),
                  "out_rel": _rel(out, whole[0][:, rows]),
                  "dq_bitwise": bool(jnp.array_equal(dq, whole[1][:, rows])),
                  "dq_rel": _rel(dq, whole[1][:, rows]),
                  "fwd_ms": median_ms(forward, *shard_args, offset, repeats=args.repeats),
                  "fwd_bwd_ms": median_ms(forward_backward, *shard_args, dout[:, rows], offset,
                                          repeats=args.repeats)}
        result["shards_detail"].append(detail)
        print(json.dumps(detail), flush=True)
    result["dk_rel"] = _rel(dk_sum[:, halo:], whole[2])
    result["dv_rel"] = _rel(dv_sum[:, halo:], whole[3])
    result["dcore_k_rel"] = _rel(dck_sum, whole[4])
    result["halo_rows_grad_before_0"] = float(jnp.abs(dk_sum[:, :halo]).max())
    for key in ("fwd_ms", "fwd_bwd_ms"):
        times = [d[key] for d in result["shards_detail"]]
        result[f"shards_{key}_sum"] = sum(times)
        result[f"shards_{key}_max"] = max(times)
    summary = {key: value for key, value in result.items() if key != "shards_detail"}
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
