"""Benchmark decoding with the compressed CCA cache against a full KV cache (a benchmark, not a
test; it needs a GPU for the real sizes).

    python -m benchmarks.bench_decode [--contexts 32768 65536 131072] [--e2e-prompt 65536]
                                   [--json FILE] [--smoke]

1. One decode-attention step (one layer, one new query per sequence) at each context length,
   Llama2-7B attention shapes by default (H = Hkv = 32, d = 128, bf16, g = 16, w = 1024):
   - cca: the split-K Pallas kernel over [visible core tokens ; raw ring] of a cache holding
     `context` tokens (C = floor((L - w) / g) core tokens per query head, w + g raw slots);
   - full-cache decode attention over all L keys: a jnp dot (`decode_attention_reference`,
     XLA), cuDNN (`jax.nn.dot_product_attention`, when it accepts the shapes) and the same
     split-K Pallas kernel run over the full cache (flash-decoding);
   device time per step (the step chained `--repeats` times inside one jitted loop, median
   of 5 such runs after warm-up), the bytes each one must read and the speed-up of cca
   over each full-cache variant.
2. End to end: a random-weight LLaMA of `benchmarks.shapes.SHAPES[--e2e-shape]` (default
   llama-1b) in bf16, one prompt of `--e2e-prompt` tokens, `--e2e-new-tokens` greedy tokens
   with `cca_jax.generate`'s cached decoding, attention="cca" and "full": prefill seconds
   (compile excluded) and decode tokens/s, and the cache bytes of each.

On a CPU the script refuses the real sizes; `--smoke` runs tiny sizes (Pallas kernel in
interpret mode) to check that everything runs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.shapes import TINY_SHAPE
from cca_jax.config import DEFAULT_CCA
from cca_kernels.decode import decode_attention_pallas, decode_attention_reference
from cca_kernels.visibility import visible_core_count

# Largest sizes a CPU may run (the Pallas kernel in interpret mode, jnp elsewhere).
CPU_MAX_CONTEXT = 4096
CPU_MAX_PROMPT = 1024
def per_step_ms(step, q, *rest, steps: int = 200, repeats: int = 5) -> float:
    """Device time of one `step(q, *rest) -> out` (out shaped like q), chained `steps` times."""
    @jax.jit
    def chain(q, *rest):
        def body(_, q):
            return q + step(q, *rest).astype(q.dtype) * jnp.asarray(1e-3, q.dtype)
        return jax.lax.fori_loop(0, steps, body, q)

    jax.block_until_ready(chain(q, *rest))
    best = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(chain(q, *rest))
        best.append((time.perf_counter() - start) * 1e3 / steps)
    return sorted(best)[len(best) // 2]


def decode_step_inputs(context: int, batch: int, heads: int, kv_heads: int, head_dim: int,
                       g: int, w: int, dtype, seed: int = 0):
    """Random cache contents for a query at position t = context - 1."""
    t = context - 1
    C = visible_core_count(t, g, w)
    R = min(w + g, context)
    keys = jax.random.split(jax.random.PRNGKey(seed), 7)
    normal = lambda i, shape: jax.random.normal(keys[i], shape, dtype)
    q = normal(0, (batch, heads, head_dim))
    core_k, core_v = normal(1, (batch, C, heads, head_dim)), normal(2, (batch, C, heads, head_dim))
    raw_k, raw_v = normal(3, (batch, R, kv_heads, head_dim)), normal(4, (batch, R, kv_heads,
                                                                         head_dim))
    # Ring slot s holds position t - ((t - s) mod R); visible iff >= c(t) * g.
    slots = np.arange(R)
    valid = (t - (t - slots) % R) >= C * g
    raw_valid = jnp.asarray(np.broadcast_to(valid, (batch, R)))
    core_count = jnp.full((batch,), C, jnp.int32)
    full_k = normal(5, (batch, context, kv_heads, head_dim))
    full_v = normal(6, (batch, context, kv_heads, head_dim))
    full_valid = jnp.ones((batch, context), bool)
    return dict(q=q, core_k=core_k, core_v=core_v, core_count=core_count, raw_k=raw_k,
                raw_v=raw_v, raw_valid=raw_valid, full_k=full_k, full_v=full_v,
                full_valid=full_valid)


def bench_attention_step(contexts, batch, heads, kv_heads, head_dim, g, w, dtype, repeats,
                         interpret):
    rows = []
    itemsize = jnp.dtype(dtype).itemsize
    cca = jax.jit(lambda q, rk, rv, valid, ck, cv, count: decode_attention_pallas(
        q, rk, rv, valid, ck, cv, count, interpret=interpret))
    full_pallas = jax.jit(lambda q, k, v, valid: decode_attention_pallas(
        q, k, v, valid, interpret=interpret))
    full_dot = jax.jit(lambda q, k, v, valid: decode_attention_reference(q, k, v, valid))
    full_cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q[:, None], k, v, implementation="cudnn")[:, 0])
    for context in contexts:
        x = decode_step_inputs(context, batch, heads, kv_heads, head_dim, g, w, dtype,
                               seed=context)
        C, R = x["core_k"].shape[1], x["raw_k"].shape[1]
        row = {"context": context, "core_tokens": C, "raw_slots": R,
               "cca_bytes": (2 * C * heads + 2 * R * kv_heads) * head_dim * itemsize * batch,
               "full_bytes": 2 * context * kv_heads * head_dim * itemsize * batch}
        cca_args = (x["q"], x["raw_k"], x["raw_v"], x["raw_valid"], x["core_k"], x["core_v"],
                    x["core_count"])
        full_args = (x["q"], x["full_k"], x["full_v"], x["full_valid"])
        # Correctness first: the kernel against the jnp path on these very inputs.
        got = cca(*cca_args).astype(jnp.float32)
        ref = decode_attention_reference(*cca_args).astype(jnp.float32)
        row["cca_rel_err_vs_jnp"] = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
        # Device time per step: chained inside one jitted loop, as in a real decode step
        # (a per-call wall clock would mostly measure dispatch at these sub-0.1 ms times).
        row["cca_ms"] = per_step_ms(cca, *cca_args, steps=repeats)
        row["full_jnp_dot_ms"] = per_step_ms(full_dot, *full_args, steps=repeats)
        row["full_pallas_split_k_ms"] = per_step_ms(full_pallas, *full_args, steps=repeats)
        try:
            row["full_cudnn_ms"] = per_step_ms(full_cudnn, x["q"], x["full_k"], x["full_v"],
                                               steps=repeats)
        except Exception as error:   # cuDNN refuses some shapes / is absent on the CPU
            row["full_cudnn_ms"] = None
            row["full_cudnn_error"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
        full_times = [row[k] for k in ("full_jnp_dot_ms", "full_pallas_split_k_ms",
                                       "full_cudnn_ms") if row.get(k) is not None]
        row["speedup_vs_jnp_dot"] = row["full_jnp_dot_ms"] / row["cca_ms"]
        row["speedup_vs_best_full"] = min(full_times) / row["cca_ms"]
        row["cca_gb_per_s"] = row["cca_bytes"] / row["cca_ms"] / 1e6
        rows.append(row)
        cudnn = (f"{row['full_cudnn_ms']:.3f}" if row["full_cudnn_ms"] is not None else "n/a")
        print(f"  L={context:>7}: cca {row['cca_ms']:.3f} ms ({row['cca_gb_per_s']:.0f} GB/s) | "
              f"full: jnp dot {row['full_jnp_dot_ms']:.3f} ms, pallas split-K "
              f"{row['full_pallas_split_k_ms']:.3f} ms, cuDNN {cudnn} ms | speed-up "
              f"{row['speedup_vs_jnp_dot']:.1f}x vs jnp dot, {row['speedup_vs_best_full']:.1f}x "
              f"vs best full; kernel rel. err {row['cca_rel_err_vs_jnp']:.1e}", flush=True)
        del x
    return rows


def bench_end_to_end(shape_name, prompt_len, new_tokens, g, w, dtype_name, full_decode,
                     interpret):
    from flax import nnx

    from cca_jax import LlamaConfig, LlamaForCausalLM
    from cca_jax.generate import CachedGeneration

    if shape_name == "tiny":
        shape = TINY_SHAPE
    else:
        from benchmarks.shapes import SHAPES
        shape = SHAPES[shape_name]
    results = {}
    for attention in ("cca", "full"):
        config = LlamaConfig(**shape, attention=attention, group_size=g, window_size=w,
                             dtype=dtype_name, param_dtype=dtype_name,
                             attention_implementation="pallas" if jax.default_backend() == "gpu"
                             else "xla")
        model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
        prompt = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (1, prompt_len), 0,
                                               config.vocab_size), np.int32)
        decode = "auto" if attention == "cca" else full_decode
        if interpret:
            decode = "pallas" if decode in ("auto", "pallas") else decode
        session = CachedGeneration(model, prompt, new_tokens, attention=attention,
                                   decode_implementation=decode, interpret=interpret)
        session.compile()
        tokens = [t for t in session]
        stats = session.stats
        results[attention] = {
            "prefill_s": stats.prefill_s, "compile_s": stats.compile_s,
            "decode_tokens_per_s": stats.decode_tokens_per_s, "new_tokens": stats.new_tokens,
            "decode_implementation": session.implementation,
            "cache_bytes": stats.cache_bytes, "full_cache_bytes": stats.full_cache_bytes,
            "first_tokens": [int(t[0]) for t in tokens[:8]]}
        r = results[attention]
        print(f"  {attention:>4}: prefill {r['prefill_s']:.2f} s, decode "
              f"{r['decode_tokens_per_s']:.1f} tokens/s ({r['decode_implementation']}), cache "
              f"{r['cache_bytes'] / 2**20:.1f} MiB, compile {r['compile_s']:.1f} s", flush=True)
        del model, session
    return results


def markdown(meta, rows, e2e) -> str:
    lines = [f"Decode with the CCA cache ({meta['device']}, jax {meta['jax']}, {meta['date']}; "
             f"`{meta['command']}`)", "",
             f"One decode-attention step, B={meta['batch']}, H={meta['heads']}, "
             f"Hkv={meta['kv_heads']}, d={meta['head_dim']}, {meta['dtype']}, g={meta['g']}, "
             f"w={meta['w']}:", "",
             "| context | cca (ms) | full jnp dot (ms) | full Pallas split-K (ms) | full cuDNN (ms) "
             "| speed-up vs jnp dot | vs best full |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cudnn = f"{r['full_cudnn_ms']:.3f}" if r["full_cudnn_ms"] is not None else "n/a"
        lines.append(f"| {r['context']} | {r['cca_ms']:.3f} | {r['full_jnp_dot_ms']:.3f} | "
                     f"{r['full_pallas_split_k_ms']:.3f} | {cudnn} | "
                     f"{r['speedup_vs_jnp_dot']:.1f}x | {r['speedup_vs_best_full']:.1f}x |")
    if e2e:
        lines += ["", f"End to end, {meta['e2e_shape']} (random weights, {meta['dtype']}), "
                      f"prompt {meta['e2e_prompt']} tokens, {meta['e2e_new_tokens']} new tokens:",
                  "", "| attention | prefill (s) | decode (tokens/s) | decode attention | cache |",
                  "|---|---:|---:|---|---:|"]
        for attention, r in e2e.items():
            lines.append(f"| {attention} | {r['prefill_s']:.2f} | "
                         f"{r['decode_tokens_per_s']:.1f} | {r['decode_implementation']} | "
                         f"{r['cache_bytes'] / 2**30:.3f} GiB |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 65536, 131072],
                        help="context lengths of the attention-step benchmark")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=DEFAULT_CCA.group_size)
    parser.add_argument("--window-size", type=int, default=DEFAULT_CCA.window_size)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--repeats", type=int, default=200,
                        help="decode-attention steps chained in one timed loop")
    parser.add_argument("--e2e-shape", default="llama-1b",
                        help="benchmarks.shapes.SHAPES key, or 'tiny' (default: %(default)s)")
    parser.add_argument("--e2e-prompt", type=int, default=65536, help="prompt tokens")
    parser.add_argument("--e2e-new-tokens", type=int, default=128, help="tokens to generate")
    parser.add_argument("--e2e-full-decode", choices=["pallas", "jnp"], default="pallas",
                        help="decode attention of the full-cache run (default: %(default)s, "
                             "the same split-K kernel over the whole cache)")
    parser.add_argument("--skip-e2e", action="store_true", help="only the attention step")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes for a CPU smoke run (kernel in interpret mode)")
    serve = parser.add_argument_group(
        "serving benchmark (with --shape; see benchmarks/bench_serve.py)")
    serve.add_argument("--shape", help="benchmarks.shapes.SHAPES key, e.g. llama2-7b: run the "
                                       "serving benchmark instead of the sections above")
    serve.add_argument("--attention", nargs="+", choices=("cca", "full"),
                       default=["cca", "full"])
    serve.add_argument("--lengths", type=int, nargs="*", default=[8192, 32768, 131072],
                       help="prompt lengths of the B = 1 runs")
    serve.add_argument("--batch-lengths", type=int, nargs="*", default=[32768, 131072],
                       help="prompt lengths of the batch runs")
    serve.add_argument("--batches", nargs="*", default=["1", "8", "32", "max"],
                       help="batch sizes of the batch runs ('max': the largest that fits)")
    serve.add_argument("--prefill-batches", nargs="*", default=[], metavar="B:L",
                       help="real prefills of B prompts of L tokens (then decoding)")
    serve.add_argument("--new-tokens", type=int, default=64, help="decode steps timed")
    serve.add_argument("--prefill-repeats", type=int, default=1, metavar="N",
                       help="B = 1 runs: time N whole generations after the warm-up one and "
                            "report the median prefill (default %(default)s; short prompts "
                            "take tens of ms, where one run is within noise)")
    serve.add_argument("--skip-exactness", action="store_true")
    serve.add_argument("--bandwidth", type=float, default=None, metavar="TB/s",
                       help="memory bandwidth of the roofline (default 4.3: the copy ceiling "
                            "of an H200, bytes read plus written)")
    args = parser.parse_args(argv)
    if args.shape:
        from benchmarks import bench_serve
        return bench_serve.run(args)

    gpu = jax.default_backend() == "gpu"
    if args.smoke:
        args.contexts, args.heads, args.kv_heads, args.head_dim = [256, 1024], 4, 2, 32
        args.group_size, args.window_size, args.repeats = 4, 64, 3
        args.e2e_shape, args.e2e_prompt, args.e2e_new_tokens = "tiny", 256, 8
    if not gpu:
        too_big = [f"--contexts {c}" for c in args.contexts if c > CPU_MAX_CONTEXT]
        if not args.skip_e2e:
            if args.e2e_prompt > CPU_MAX_PROMPT:
                too_big.append(f"--e2e-prompt {args.e2e_prompt}")
            if args.e2e_shape != "tiny":
                too_big.append(f"--e2e-shape {args.e2e_shape}")
        if too_big:
            print(f"benchmarks.bench_decode times decoding on a GPU; this backend is "
                  f"{jax.default_backend()!r}, and {', '.join(too_big)} would take far too long "
                  f"here. For a smoke run on the CPU pass --smoke (or contexts <= "
                  f"{CPU_MAX_CONTEXT}, --e2e-shape tiny and --e2e-prompt <= {CPU_MAX_PROMPT}).",
                  file=sys.stderr)
            return 2
    for name in ("batch", "heads", "kv_heads", "head_dim", "group_size", "window_size",
                 "repeats", "e2e_prompt", "e2e_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.heads % args.kv_heads:
        parser.error("--heads must be a multiple of --kv-heads")
    if any(c < 1 for c in args.contexts):
        parser.error("--contexts must be >= 1")
    interpret = not gpu
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0].device_kind
    meta = {"device": device, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
            "command": "python -m benchmarks.bench_decode " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads,
            "head_dim": args.head_dim, "g": args.group_size, "w": args.window_size,
            "dtype": args.dtype, "e2e_shape": args.e2e_shape, "e2e_prompt": args.e2e_prompt,
            "e2e_new_tokens": args.e2e_new_tokens, "interpret": interpret}
    print(f"device: {device} ({jax.default_backend()}), jax {jax.__version__}"
          + ("; SMOKE RUN: tiny sizes, Pallas in interpret mode, timings meaningless"
             if interpret else ""))
    print(f"[1/2] decode-attention step: B={args.batch}, H={args.heads}, Hkv={args.kv_heads}, "
          f"d={args.head_dim}, {args.dtype}, g={args.group_size}, w={args.window_size}",
          flush=True)
    rows = bench_attention_step(args.contexts, args.batch, args.heads, args.kv_heads,
                                args.head_dim, args.group_size, args.window_size, dtype,
                                args.repeats, interpret)
    e2e = None
    if not args.skip_e2e:
        print(f"[2/2] end to end: {args.e2e_shape}, prompt {args.e2e_prompt} tokens, "
              f"{args.e2e_new_tokens} new tokens, {args.dtype}", flush=True)
        e2e = bench_end_to_end(args.e2e_shape, args.e2e_prompt, args.e2e_new_tokens,
                               args.group_size, args.window_size, args.dtype,
                               args.e2e_full_decode, interpret)
        if e2e["cca"]["first_tokens"] != e2e["full"]["first_tokens"]:
            print("  (cca and full choose different tokens: expected with random weights and a "
                  "prompt longer than w)")
    print()
    print(markdown(meta, rows, e2e))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "attention_step": rows, "end_to_end": e2e}, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
