"""Benchmark a whole model step: forward+backward of a LLaMA-shaped model, CCA vs full.

    python -m benchmarks.bench_model [--shape smollm2-135m] [--seq-len 32768] [--dtype bfloat16]

Random weights of the chosen shape, one sequence of `--seq-len` tokens, loss = mean token
cross-entropy computed in float32 over sequence chunks of 4096 by fine-tuning's own loss
(`train.loss.token_nll`: no [L, vocab] float32 array for the whole sequence at once). Times jitted value_and_grad (median of repeats after
warm-up) for attention="cca" (Pallas on a GPU) and attention="full" (cuDNN on a GPU).
A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
from flax import nnx

from cca_jax import LlamaConfig, LlamaForCausalLM
from benchmarks.shapes import SHAPES
from cca_jax.config import DEFAULT_CCA
from train.loss import token_nll

def mean_token_loss(model, tokens, chunk: int = 4096):
    """Mean next-token cross-entropy: fine-tuning's loss (`train.loss.token_nll`)."""
    total, count = token_nll(model, tokens, chunk)
    return total / count


def time_step(config: LlamaConfig, seq_len: int, repeats: int):
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def step(params, tokens):
        return jax.value_and_grad(
            lambda p: mean_token_loss(nnx.merge(graphdef, p), tokens))(params)

    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, seq_len + 1), 0, config.vocab_size)
    start = time.perf_counter()
    loss, grads = step(params, tokens)
    jax.block_until_ready(grads)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(params, tokens))
        times.append((time.perf_counter() - start) * 1e3)
    return {"loss": float(loss), "step_ms": statistics.median(times), "first_call_s": compile_s,
            "tokens_per_s": seq_len / (statistics.median(times) / 1e3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--group-size", type=int, default=DEFAULT_CCA.group_size)
    parser.add_argument("--window-size", type=int, default=DEFAULT_CCA.window_size)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}; shape {args.shape}, L={args.seq_len}, "
          f"{args.dtype}, g={args.group_size}, w={args.window_size}")
    results = {}
    for attention in ("cca", "full"):
        config = LlamaConfig(**SHAPES[args.shape], attention=attention, dtype=args.dtype,
                             param_dtype=args.dtype, group_size=args.group_size,
                             window_size=args.window_size)
        results[attention] = time_step(config, args.seq_len, args.repeats)
        r = results[attention]
        print(f"  {attention:>4}: step {r['step_ms']:.1f} ms ({r['tokens_per_s']:.0f} tokens/s), "
              f"loss {r['loss']:.4f}, first call {r['first_call_s']:.1f} s", flush=True)
    speedup = results["full"]["step_ms"] / results["cca"]["step_ms"]
    print(f"\nforward+backward at L={args.seq_len}: cca {results['cca']['step_ms']:.1f} ms, "
          f"full {results['full']['step_ms']:.1f} ms, speed-up {speedup:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "speedup": speedup}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
