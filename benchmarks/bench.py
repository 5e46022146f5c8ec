"""Benchmark: CCA attention (Pallas) against cuDNN causal attention, same inputs, same run.

    python -m benchmarks.bench [--lengths 4096 8192 ...] [--kv-heads 32 8] [--out DIR]

For each length and KV-head count: B=1, H=32, d=128, g=16, w=1024, bf16. Times the CCA
forward (pooling included) and forward+backward, and `jax.nn.dot_product_attention(
implementation="cudnn", is_causal=True)` forward and forward+backward, as the median of
repeats after warm-up. Effective TFLOP/s counts only the keys each query really sees
(docs/cca.md §4): forward 4*d*H*sum_m keys(m), backward 2.5 times that. Peak memory is
XLA's compiled estimate (arguments + outputs + temporaries). Prints a table, writes JSON
and a log-log PNG of time against L. A benchmark, not a test: it needs a GPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cca_kernels.visibility import visible_core_count

H, D, G, W = 32, 128, 16, 1024


def visible_keys(L: int, g: int = G, w: int = W) -> int:
    m = np.arange(L)
    c = np.asarray(visible_core_count(m, g, w))
    return int((c + (m + 1 - c * g)).sum())


def median_ms(fn, *args, warmup: int = 3, repeats: int = 20) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def planned_bytes(compiled) -> int:
    """XLA's memory plan of a compiled function: arguments + outputs + temporaries."""
    analysis = compiled.memory_analysis()
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
               + analysis.temp_size_in_bytes)


def peak_bytes(fn, *args) -> int:
    return planned_bytes(fn.lower(*args).compile())


def make_functions(implementation: str):
    from cca_jax import causal_attention, cca_attention

    if implementation == "cudnn":
        attend = lambda q, k, v: causal_attention(q, k, v, implementation="cudnn")
    else:
        attend = lambda q, k, v: cca_attention(q, k, v, group_size=G, window_size=W,
                                               implementation=implementation)

    forward = jax.jit(attend)

    def loss(q, k, v, dout):
        return jnp.sum(attend(q, k, v).astype(jnp.float32) * dout.astype(jnp.float32))

    forward_backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return forward, forward_backward


def run(lengths, kv_heads_list, repeats, implementation):
    rows = []
    cca_fwd, cca_fb = make_functions(implementation)
    full_fwd, full_fb = make_functions("cudnn")
    for kv_heads in kv_heads_list:
        for L in lengths:
            keys = jax.random.split(jax.random.PRNGKey(L + kv_heads), 4)
            q = jax.random.normal(keys[0], (1, L, H, D), jnp.bfloat16)
            k = jax.random.normal(keys[1], (1, L, kv_heads, D), jnp.bfloat16)
            v = jax.random.normal(keys[2], (1, L, kv_heads, D), jnp.bfloat16)
            dout = jax.random.normal(keys[3], (1, L, H, D), jnp.bfloat16)
            reps = max(5, repeats if L <= 32768 else repeats // 2)
            row = {"L": L, "H": H, "Hkv": kv_heads, "d": D, "g": G, "w": W,
                   "visible_keys": visible_keys(L)}
            row["cca_fwd_ms"] = median_ms(cca_fwd, q, k, v, repeats=reps)
            row["cca_fwdbwd_ms"] = median_ms(cca_fb, q, k, v, dout, repeats=reps)
            row["full_fwd_ms"] = median_ms(full_fwd, q, k, v, repeats=reps)
            row["full_fwdbwd_ms"] = median_ms(full_fb, q, k, v, dout, repeats=reps)
            row["cca_fwd_peak_gb"] = peak_bytes(cca_fwd, q, k, v) / 2**30
            row["cca_fwdbwd_peak_gb"] = peak_bytes(cca_fb, q, k, v, dout) / 2**30
            row["full_fwdbwd_peak_gb"] = peak_bytes(full_fb, q, k, v, dout) / 2**30
            flops_fwd = 4 * D * H * row["visible_keys"]
            row["speedup_fwd"] = row["full_fwd_ms"] / row["cca_fwd_ms"]
            row["speedup_fwdbwd"] = row["full_fwdbwd_ms"] / row["cca_fwdbwd_ms"]
            row["cca_fwd_tflops"] = flops_fwd / row["cca_fwd_ms"] / 1e9
            bwd_ms = row["cca_fwdbwd_ms"] - row["cca_fwd_ms"]
            row["cca_bwd_tflops"] = 2.5 * flops_fwd / bwd_ms / 1e9 if bwd_ms > 0 else float("nan")
            rows.append(row)
            print(f"  L={L:>6} Hkv={kv_heads:>2}: cca fwd {row['cca_fwd_ms']:.2f} ms, "
                  f"fwd+bwd {row['cca_fwdbwd_ms']:.2f} ms; cudnn {row['full_fwd_ms']:.2f} / "
                  f"{row['full_fwdbwd_ms']:.2f} ms", flush=True)
            del q, k, v, dout
    return rows


def print_table(rows):
    header = (f"{'L':>7} {'Hkv':>3} | {'cca fwd':>8} {'cudnn':>8} {'x':>5} | {'cca f+b':>8} "
              f"{'cudnn':>8} {'x':>5} | {'TF/s fwd':>8} {'TF/s bwd':>8} | {'peak GB f+b':>11}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['L']:>7} {r['Hkv']:>3} | {r['cca_fwd_ms']:>8.2f} {r['full_fwd_ms']:>8.2f} "
              f"{r['speedup_fwd']:>5.2f} | {r['cca_fwdbwd_ms']:>8.2f} {r['full_fwdbwd_ms']:>8.2f} "
              f"{r['speedup_fwdbwd']:>5.2f} | {r['cca_fwd_tflops']:>8.0f} {r['cca_bwd_tflops']:>8.0f}"
              f" | {r['cca_fwdbwd_peak_gb']:>5.2f}/{r['full_fwdbwd_peak_gb']:<5.2f}")


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for kv_heads in sorted({r["Hkv"] for r in rows}, reverse=True):
        sel = [r for r in rows if r["Hkv"] == kv_heads]
        Ls = [r["L"] for r in sel]
        for key, label, style in (("cca_fwd_ms", "CCA fwd", "o-"),
                                  ("cca_fwdbwd_ms", "CCA fwd+bwd", "s-"),
                                  ("full_fwd_ms", "cuDNN causal fwd", "o--"),
                                  ("full_fwdbwd_ms", "cuDNN causal fwd+bwd", "s--")):
            ax.plot(Ls, [r[key] for r in sel], style, label=f"{label} (Hkv={kv_heads})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("time (ms)")
    ax.set_title(f"CCA (g={G}, w={W}) vs cuDNN causal attention, H={H}, d={D}, bf16, "
                 f"{jax.devices()[0].device_kind}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8])
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats (median)")
    parser.add_argument("--implementation", default="pallas", choices=["pallas", "xla"],
                        help="CCA implementation to time (default: %(default)s)")
    parser.add_argument("--out", default="bench_out", help="directory for JSON and PNG")
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        print(f"error: the benchmark needs a GPU (cuDNN); backend is {jax.default_backend()!r}",
              file=sys.stderr)
        return 1
    device = jax.devices()[0].device_kind
    print(f"device: {device}, jax {jax.__version__}; CCA implementation {args.implementation}")
    rows = run(args.lengths, args.kv_heads, args.repeats, args.implementation)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
            "command": "python -m benchmarks.bench " + " ".join(argv or sys.argv[1:]),
            "implementation": args.implementation}
    (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot(rows, out / "bench.png")
    print(f"\nwrote {out / 'bench.json'} and {out / 'bench.png'}\n")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
