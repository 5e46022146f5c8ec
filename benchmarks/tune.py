"""Per-kernel timings of the CCA Pallas kernels for a list of block-size candidates (GPU).

    python -m benchmarks.tune [--lengths 32768 131072] [--kv-heads 32]

Times, at B=1, H=32, d=128, g=16, w=1024, bf16: the forward kernel, the three backward
kernels (dq, dk/dv, dcore) and the jnp pooling forward and VJP, each alone (median of
repeats after warm-up), for every candidate in CANDIDATES. Used to fill the block-size
table in cca_kernels/cca_common.py; results go to cca_kernels/NOTES.md by hand.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp

from benchmarks.bench import median_ms
from cca_kernels.cca_bwd import cca_backward_dcore, cca_backward_dkv, cca_backward_dq
from cca_kernels.cca_common import Static, default_block_sizes
from cca_kernels.cca_fwd import cca_forward
from cca_kernels.visibility import visible_core_count

H, D, G, W = 32, 128, 16, 1024


def candidates():
    base = dataclasses.replace(default_block_sizes(D, jnp.bfloat16, interpret=False),
                               num_warps_bwd=4)
    out = {"default": base}
    for name, change in {
        "bwd_w4s3": dict(num_warps_bwd=4, num_stages_bwd=3),
        "bwd_w4_dq128x64": dict(num_warps_bwd=4, block_q_dq=128, block_k_dq=64),
        "bwd_w4_dq64x32": dict(num_warps_bwd=4, block_q_dq=64, block_k_dq=32),
        "bwd_w4_dkv32x64": dict(num_warps_bwd=4, block_q_dkv=32, block_k_dkv=64),
        "bwd_w4_dkv64x32": dict(num_warps_bwd=4, block_q_dkv=64, block_k_dkv=32),
        "bwd_w4_dkv32x128": dict(num_warps_bwd=4, block_q_dkv=32, block_k_dkv=128),
        "bwd_w2s2": dict(num_warps_bwd=2, num_stages_bwd=2),
        "fwd_w4s3": dict(num_warps=4, num_stages=3),
        "fwd_w4_128x128s2": dict(num_warps=4, block_q=128, block_k=128, num_stages=2),
        "fwd_w8_128x128s3": dict(num_warps=8, block_q=128, block_k=128, num_stages=3),
    }.items():
        out[name] = dataclasses.replace(base, **change)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--only", nargs="*", help="candidate names to run (default: all)")
    args = parser.parse_args(argv)
    from cca_jax.reference import pool_core_tokens  # the pooling the op uses

    for L in args.lengths:
        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        q = jax.random.normal(keys[0], (1, L, H, D), jnp.bfloat16)
        k = jax.random.normal(keys[1], (1, L, args.kv_heads, D), jnp.bfloat16)
        v = jax.random.normal(keys[2], (1, L, args.kv_heads, D), jnp.bfloat16)
        dout = jax.random.normal(keys[3], (1, L, H, D), jnp.bfloat16)
        C = visible_core_count(L - 1, G, W)
        pool = jax.jit(lambda q, k, v: pool_core_tokens(q, k, v, group_size=G, scale=D ** -0.5,
                                                        num_groups=C))
        ck, cv = pool(q, k, v)
        ck, cv = ck.astype(q.dtype), cv.astype(q.dtype)
        pool_vjp = jax.jit(lambda q, k, v, a, b: jax.vjp(
            lambda q, k, v: pool_core_tokens(q, k, v, group_size=G, scale=D ** -0.5,
                                             num_groups=C), q, k, v)[1]((a, b)))
        print(f"L={L}: pooling fwd {median_ms(pool, q, k, v):.2f} ms, pooling vjp "
              f"{median_ms(pool_vjp, q, k, v, ck.astype(jnp.float32), cv.astype(jnp.float32)):.2f} ms",
              flush=True)
        for name, blocks in candidates().items():
            if args.only and name not in args.only:
                continue
            Cp = -(-C // blocks.core_multiple) * blocks.core_multiple
            pad = lambda x: jnp.pad(x, [(0, 0), (0, Cp - C), (0, 0), (0, 0)])
            st = Static(group_size=G, window_size=W, scale=D ** -0.5, ratio=H // args.kv_heads,
                        has_core=True, blocks=blocks, interpret=False, exact_f32=True)
            ckp, cvp = pad(ck), pad(cv)
            try:
                fwd = jax.jit(lambda q, k, v, a, b: cca_forward(q, k, v, a, b, st))
                out, lse = fwd(q, k, v, ckp, cvp)
                delta = jnp.transpose(jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32),
                                              -1), (0, 2, 1))
                t_fwd = median_ms(fwd, q, k, v, ckp, cvp)
                t_dq = median_ms(jax.jit(lambda *a: cca_backward_dq(*a, st)), q, k, v, ckp, cvp,
                                 dout, lse, delta)
                t_dkv = median_ms(jax.jit(lambda *a: cca_backward_dkv(*a, st)), q, k, v, dout,
                                  lse, delta)
                t_dc = median_ms(jax.jit(lambda *a: cca_backward_dcore(*a, st)), q, ckp, cvp,
                                 dout, lse, delta)
                print(f"  {name:>14}: fwd {t_fwd:7.2f}  dq {t_dq:7.2f}  dkv {t_dkv:7.2f}  "
                      f"dcore {t_dc:7.2f}  bwd-sum {t_dq + t_dkv + t_dc:7.2f} ms", flush=True)
            except Exception as error:  # a candidate that does not compile (shared memory)
                print(f"  {name:>14}: failed: {type(error).__name__}: {str(error)[:200]}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
