"""Sweep the split-K decode kernel's parameters and time one decode-attention step on the
device (GPU): `python -m benchmarks.tune_decode [--contexts 32768 131072]`.

Each variant runs `--steps` times inside one jitted `fori_loop` (the query of step i+1 depends
on the output of step i), so the time per step is device time without per-call dispatch, as
inside a real jitted decode step. Shapes: Llama2-7B attention (H = Hkv = 32, d = 128), bf16,
g = 16, w = 1024.
"""
from __future__ import annotations

import argparse
import itertools
import sys

import jax
import jax.numpy as jnp

from benchmarks.bench_decode import decode_step_inputs, per_step_ms
from cca_kernels.decode import decode_attention_pallas, decode_attention_reference


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune_decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    args = parser.parse_args(argv)
    for context in args.contexts:
        x = decode_step_inputs(context, 1, 32, 32, 128, 16, 1024, jnp.bfloat16, seed=context)
        full = (x["full_k"], x["full_v"], x["full_valid"])
        cca = (x["raw_k"], x["raw_v"], x["raw_valid"], x["core_k"], x["core_v"], x["core_count"])
        t_dot = per_step_ms(lambda q, k, v, m: decode_attention_reference(q, k, v, m), x["q"], *full)
        t_cudnn = per_step_ms(lambda q, k, v: jax.nn.dot_product_attention(
            q[:, None], k, v, implementation="cudnn")[:, 0], x["q"], x["full_k"], x["full_v"])
        t_full_pallas = per_step_ms(lambda q, k, v, m: decode_attention_pallas(
            q, k, v, m, chunk=2048, max_splits=64), x["q"], *full)
        print(f"L={context}: full jnp dot {t_dot:.4f} ms, cuDNN {t_cudnn:.4f} ms, "
              f"pallas split-K {t_full_pallas:.4f} ms", flush=True)
        best_full = min(t_dot, t_cudnn, t_full_pallas)
        for block_k, chunk, max_splits, warps in itertools.product(
                (64, 128), (128, 256, 512), (32, 64), (4, 8)):
            try:
                t = per_step_ms(lambda q, *r: decode_attention_pallas(
                    q, *r, block_k=block_k, chunk=chunk, max_splits=max_splits,
                    num_warps=warps), x["q"], *cca)
                print(f"  cca block {block_k:>3} chunk {chunk:>4} splits {max_splits:>2} "
                      f"warps {warps}: {t:.4f} ms  ({best_full / t:.1f}x vs best full)",
                      flush=True)
            except Exception as error:
                print(f"  cca block {block_k} chunk {chunk} splits {max_splits} warps {warps}: "
                      f"failed {type(error).__name__}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
