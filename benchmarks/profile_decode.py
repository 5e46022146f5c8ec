"""Where a cached-generation token's time goes on a GPU (a profile, not a test).

    python -m benchmarks.profile_decode [--shape llama2-7b] [--prompt 8192]
        [--attention cca full] [--steps 16] [--batch 1] [--out DIR]

Random weights of `benchmarks.shapes.SHAPES[--shape]` in bf16. For each attention kind, one
`CachedGeneration` is compiled and run once to warm up; then a `jax.profiler` trace is taken
of the prefill (until the first token is on the host) and, separately, of `--steps` decode
tokens. Each trace's GPU kernels are summed by kind (matrix products, the Pallas attention
kernels, cache writes and copies, other fused element-wise work) and set against the wall
time: `gpu busy` is the kernels' total, `idle` what the GPU waited for the host. The traces
(Perfetto JSON) and a JSON summary go under --out.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import inspect
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from cca_jax.config import DEFAULT_CCA

CATEGORIES = (
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "matmul", "dot")),
    ("attention kernel", ("cca_", "decode_split", "flash", "fmha", "cudnn", "attention")),
    ("cache write / copy", ("dynamic_update", "dynamic-update", "scatter", "memcpy", "memset",
                            "copy", "select_and_scatter")),
    ("gather", ("gather", "dynamic_slice", "dynamic-slice")),
    ("reduce / softmax", ("reduce", "softmax")),
)


def categorize(name: str) -> str:
    low = name.lower()
    for category, needles in CATEGORIES:
        if any(n in low for n in needles):
            return category
    return "other fusions"


def gpu_kernel_events(trace_dir: Path):
    """(name, duration_us, start_us) of every event on a GPU stream thread of the trace."""
    # The trace viewer's file (HOST.trace.json.gz), else the Perfetto one.
    files = sorted(trace_dir.rglob("*.trace.json.gz")) or sorted(trace_dir.rglob("*.json.gz"))
    if not files:
        raise FileNotFoundError(f"no Perfetto trace (*.json.gz) under {trace_dir}")
    with gzip.open(files[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    process, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            process[e["pid"]] = str(e.get("args", {}).get("name", ""))
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[(e["pid"], e.get("tid"))] = str(e.get("args", {}).get("name", ""))
    out, threads_seen = [], collections.Counter()
    for e in events:
        if e.get("ph") != "X":
            continue
        pname = process.get(e.get("pid"), "")
        tname = thread.get((e.get("pid"), e.get("tid")), "")
        threads_seen[(pname, tname)] += 1
        if "gpu" in pname.lower() and "stream" in tname.lower():
            out.append((e.get("name", "?"), float(e.get("dur", 0)), float(e.get("ts", 0))))
    return out, threads_seen


def summarize(trace_dir: Path, wall_s: float, tokens: int, label: str) -> dict:
    events, threads = gpu_kernel_events(trace_dir)
    if not events:
        listing = "\n".join(f"    {p!r} / {t!r}: {n}" for (p, t), n in threads.most_common(20))
        raise RuntimeError(f"no GPU stream events in the trace of {label}; threads:\n{listing}")
    by_name = collections.defaultdict(lambda: [0.0, 0])
    by_category = collections.Counter()
    for name, dur, _ in events:
        by_name[name][0] += dur
        by_name[name][1] += 1
        by_category[categorize(name)] += dur
    busy_us = sum(by_category.values())
    span_us = max(ts + d for _, d, ts in events) - min(ts for _, _, ts in events)
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]
    return {
        "label": label, "tokens": tokens, "wall_ms": wall_s * 1e3,
        "wall_ms_per_token": wall_s * 1e3 / max(tokens, 1),
        "gpu_busy_ms_per_token": busy_us / 1e3 / max(tokens, 1),
        "gpu_span_ms": span_us / 1e3,
        "kernels": len(events),
        "kernels_per_token": len(events) / max(tokens, 1),
        "by_category_ms_per_token": {k: v / 1e3 / max(tokens, 1)
                                     for k, v in by_category.most_common()},
        "top_kernels": [{"name": n[:120], "ms_per_token": t / 1e3 / max(tokens, 1),
                         "calls_per_token": c / max(tokens, 1),
                         "category": categorize(n)} for n, (t, c) in top],
    }


def print_summary(s: dict) -> None:
    print(f"\n== {s['label']}: {s['tokens']} token(s), wall {s['wall_ms_per_token']:.3f} ms/token, "
          f"GPU busy {s['gpu_busy_ms_per_token']:.3f} ms/token "
          f"({100 * s['gpu_busy_ms_per_token'] / max(s['wall_ms_per_token'], 1e-9):.0f}%), "
          f"{s['kernels_per_token']:.0f} kernels/token", flush=True)
    for category, ms in s["by_category_ms_per_token"].items():
        print(f"   {category:<20} {ms:8.3f} ms/token")
    print("   top kernels (ms/token, calls/token):")
    for k in s["top_kernels"][:12]:
        print(f"     {k['ms_per_token']:8.3f} {k['calls_per_token']:6.0f}  [{k['category']}] "
              f"{k['name'][:90]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_decode",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama2-7b",
                        help="benchmarks.shapes.SHAPES key (default: %(default)s)")
    parser.add_argument("--prompt", type=int, default=8192, help="prompt tokens per sequence")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=16, help="decode tokens traced")
    parser.add_argument("--attention", nargs="+", choices=("cca", "full"),
                        default=["cca", "full"])
    parser.add_argument("--group-size", type=int, default=DEFAULT_CCA.group_size)
    parser.add_argument("--window-size", type=int, default=DEFAULT_CCA.window_size)
    parser.add_argument("--prefill-chunk", type=int, default=4096,
                        help="prompt columns per prefill chunk (default: %(default)s)")
    parser.add_argument("--decode-chunk", type=int, default=32,
                        help="decode steps per device call (default: %(default)s)")
    parser.add_argument("--no-trace", action="store_true",
                        help="only time a second (warm) run, no profiler trace")
    parser.add_argument("--out", default="profile_decode", help="output folder")
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        print("benchmarks.profile_decode profiles GPU kernels; this backend is "
              f"{jax.default_backend()!r}", file=sys.stderr)
        return 2
    for name in ("prompt", "batch", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")

    from flax import nnx

    from cca_jax import LlamaConfig, LlamaForCausalLM
    from cca_jax.generate import CachedGeneration
    from benchmarks.shapes import SHAPES

    if args.shape not in SHAPES:
        parser.error(f"--shape must be one of {', '.join(SHAPES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = []
    for attention in args.attention:
        config = LlamaConfig(**SHAPES[args.shape], attention=attention,
                             group_size=args.group_size, window_size=args.window_size,
                             dtype="bfloat16", param_dtype="bfloat16",
                             attention_implementation="pallas")
        model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
        prompt = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (args.batch, args.prompt),
                                               0, config.vocab_size), np.int32)
        options = {}
        accepted = inspect.signature(CachedGeneration).parameters
        for name in ("prefill_chunk", "decode_chunk"):   # (absent before chunked generation)
            if name in accepted:
                options[name] = getattr(args, name)
        session = CachedGeneration(model, prompt, args.steps + 1, attention=attention,
                                   **options)
        print(f"[{attention}] compiling ...", flush=True)
        session.compile()
        for _ in session:       # warm-up run
            pass
        print(f"[{attention}] first run: prefill {session.stats.prefill_s:.3f} s, decode "
              f"{session.stats.decode_tokens_per_s:.1f} tokens/s", flush=True)
        if args.no_trace:
            for _ in session:
                pass
            s = session.stats
            print(f"[{attention}] timed run: prefill {s.prefill_s:.3f} s ({s.prefill_chunks} "
                  f"chunks), decode {s.decode_tokens_per_s:.1f} tokens/s "
                  f"({1e3 / s.decode_tokens_per_s:.2f} ms/token, {s.decode_calls} calls)",
                  flush=True)
            summaries.append({"label": f"{attention} timed", "prefill_s": s.prefill_s,
                              "decode_tokens_per_s": s.decode_tokens_per_s})
            del model, session
            continue
        tokens = iter(session)
        prefill_dir, decode_dir = out / f"{attention}-prefill", out / f"{attention}-decode"
        start = time.perf_counter()
        with jax.profiler.trace(str(prefill_dir), create_perfetto_trace=True):
            next(tokens)
        prefill_wall = time.perf_counter() - start
        start = time.perf_counter()
        with jax.profiler.trace(str(decode_dir), create_perfetto_trace=True):
            steps = sum(1 for _ in tokens)
        decode_wall = time.perf_counter() - start
        for directory, wall, n, label in (
                (prefill_dir, prefill_wall, 1, f"{attention} prefill ({args.batch}x{args.prompt})"),
                (decode_dir, decode_wall, steps, f"{attention} decode at {args.prompt}")):
            try:
                s = summarize(directory, wall, n, label)
            except (RuntimeError, FileNotFoundError) as error:
                print(f"{label}: {error}", flush=True)
                continue
            summaries.append(s)
            print_summary(s)
        del model, session
    with open(out / "summary.json", "w") as f:
        json.dump({"args": vars(args), "device": jax.devices()[0].device_kind,
                   "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
                   "summaries": summaries}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
