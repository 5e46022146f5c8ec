"""Bytes moved by collectives per layer in context-parallel CCA, read from the compiled HLO,
against an all-gather of the keys and values built the same way (a benchmark, not a test).

    python -m benchmarks.context_bytes [--devices 8] [--lengths 131072 524288 1048576]
        [--heads 32:32 32:8] [--layout contiguous|zigzag] [--json FILE]

For each length and (H:Hkv) it compiles, for `--devices` CPU devices on one "context" axis
(d = 128, bf16, g = 16, w = 1024, B = 1), the forward and the forward+backward of
`cca_jax.context.cca_attention_context_parallel`, and of the baseline: a shard_map that
all-gathers each shard's keys and values (what full attention's context parallelism moves,
e.g. MaxText's all-gather of K/V) and uses them. Nothing runs: XLA's compiled program is
read. Every collective's result shape gives its bytes; per device, an all-gather receives
(n - 1) / n of its result, a collective-permute its whole result, a reduce-scatter (the
all-gather's transpose) sends (n - 1) / n of its operand.

Then the work per shard (visible query-key pairs) of contiguous shards and of the zigzag
layout (shard i holds pieces i and 2n - 1 - i of 2n).

The prediction: CCA moves 2 * (L / g) * H * d values (core keys and values) plus a halo of
2 * 1040 * Hkv * d; the baseline 2 * L * Hkv * d; their ratio g * Hkv / H apart from the halo.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time

BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "pred": 1, "f64": 8, "s8": 1}
COLLECTIVE = re.compile(r"=\s*\(?\s*(\w+)\[([\d,]*)\][^=]*?\b(all-gather|collective-permute|"
                        r"reduce-scatter|all-reduce|all-to-all)(?:-start)?\(")


def collective_bytes(hlo: str, n: int) -> dict:
    """Bytes each device receives per collective kind, from the compiled HLO text."""
    out: dict[str, float] = {}
    for dtype, dims, kind in COLLECTIVE.findall(hlo):
        size = BYTES.get(dtype, 4)
        for dim in filter(None, dims.split(",")):
            size *= int(dim)
        if kind in ("all-gather", "reduce-scatter"):
            # all-gather: the result holds n shards, n - 1 of them arrive; reduce-scatter:
            # the operand is n times the result, n - 1 result-sized parts leave.
            size = size * (n - 1) / n if kind == "all-gather" else size * (n - 1)
        out[kind] = out.get(kind, 0) + size
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.context_bytes",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072, 524288, 1048576])
    parser.add_argument("--heads", nargs="+", default=["32:32", "32:8"], metavar="H:HKV")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--window-size", type=int, default=1024)
    parser.add_argument("--layout", choices=("contiguous", "zigzag"), default="contiguous",
                        help="the CCA side's layout (default %(default)s)")
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.devices < 2:
        parser.error("--devices must be >= 2")
    heads = []
    for spec in args.heads:
        try:
            H, Hkv = (int(x) for x in spec.split(":"))
        except ValueError:
            parser.error(f"--heads takes H:HKV pairs, got {spec!r}")
        if H < 1 or Hkv < 1 or H % Hkv:
            parser.error(f"--heads {spec}: Hkv must divide H")
        heads.append((H, Hkv))
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from cca_jax.context import (cca_attention_context_parallel, cca_attention_shard,
                                 halo_length, shard_work)

    n, d, g, w = args.devices, args.head_dim, args.group_size, args.window_size
    mesh = jax.make_mesh((n,), ("context",), axis_types=(jax.sharding.AxisType.Auto,))
    spec = P(None, "context", None, None)

    def gather_kv(q, k, v):
        def body(q, k, v):
            k_all = jax.lax.all_gather(k, "context", axis=1, tiled=True)
            v_all = jax.lax.all_gather(v, "context", axis=1, tiled=True)
            r = q.shape[2] // k.shape[2]
            # A product of both: the backward needs every position's cotangent, as real
            # attention's does (a plain sum would let XLA reduce before the transpose).
            mix = jnp.repeat((k_all * v_all).sum(1), r, axis=1)           # [B, H, d]
            return q * mix[:, None]
        return jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)(q, k, v)

    def cca(q, k, v):
        if args.layout == "contiguous":
            return cca_attention_context_parallel(q, k, v, mesh=mesh, group_size=g,
                                                  window_size=w)
        # The inputs stand for rows already in zigzag order (a trainer keeps its tokens in
        # that order): the per-layer traffic is the shard body's, not a reordering's.
        body = functools.partial(cca_attention_shard, axis_name="context", group_size=g,
                                 window_size=w, layout="zigzag")
        return jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)(q, k, v)

    def grad_of(f):
        return jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)),
                        argnums=(0, 1, 2))

    rows = []
    print(f"{n} devices, d={d}, g={g}, w={w}, bf16, B=1, CCA layout {args.layout}; MB received "
          "per device per layer")
    print("| L | H:Hkv | pass | CCA all-gather | CCA permute | CCA other | CCA total | "
          "K/V all-gather | ratio | predicted ratio |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for L in args.lengths:
        for H, Hkv in heads:
            q = jax.ShapeDtypeStruct((1, L, H, d), jnp.bfloat16)
            kv = jax.ShapeDtypeStruct((1, L, Hkv, d), jnp.bfloat16)
            halo = halo_length(g, w)
            predicted = (2 * L * Hkv * d * (n - 1) / n) / (
                2 * (L // g) * H * d * (n - 1) / n + 2 * halo * Hkv * d)
            for name, wrap in (("fwd", lambda f: f), ("fwd+bwd", grad_of)):
                start = time.perf_counter()
                ours = collective_bytes(jax.jit(wrap(cca)).lower(q, kv, kv).compile().as_text(), n)
                base = collective_bytes(
                    jax.jit(wrap(gather_kv)).lower(q, kv, kv).compile().as_text(), n)
                total, base_total = sum(ours.values()), sum(base.values())
                row = {"L": L, "H": H, "Hkv": Hkv, "pass": name, "devices": n, "cca": ours,
                       "baseline": base, "cca_total": total, "baseline_total": base_total,
                       "ratio": base_total / total, "predicted_ratio": predicted,
                       "compile_s": time.perf_counter() - start}
                rows.append(row)
                other = total - ours.get("all-gather", 0) - ours.get("collective-permute", 0)
                print(f"| {L:,} | {H}:{Hkv} | {name} | {ours.get('all-gather', 0) / 1e6:.1f} | "
                      f"{ours.get('collective-permute', 0) / 1e6:.2f} | {other / 1e6:.1f} | "
                      f"{total / 1e6:.1f} | {base_total / 1e6:.1f} | {row['ratio']:.2f}x | "
                      f"{predicted:.2f}x |", flush=True)
                if args.json:
                    tmp = args.json + ".tmp"
                    with open(tmp, "w") as f:
                        json.dump({"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
                                   "rows": rows}, f, indent=2)
                    os.replace(tmp, args.json)
    print("\nWork per shard (visible query-key pairs, cca_jax.context.shard_work): the most "
          "loaded shard over the mean")
    print("| L | contiguous | zigzag |")
    print("|---:|---:|---:|")
    balance = []
    for L in args.lengths:
        shares = {layout: float(shard_work(L, n, g, w, layout).max()
                                / shard_work(L, n, g, w, layout).mean() - 1)
                  for layout in ("contiguous", "zigzag")}
        balance.append({"L": L, **shares})
        print(f"| {L:,} | +{100 * shares['contiguous']:.1f}% | +{100 * shares['zigzag']:.2f}% |")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__, "rows": rows,
                       "balance": balance}, f, indent=2)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
