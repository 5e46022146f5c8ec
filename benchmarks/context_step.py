"""One fine-tune step of a tiny CCA model on a single very long sequence, split over a
"context" mesh axis of CPU devices: does it run, and how much memory does each device need?
(a benchmark, not a test)

    python -m benchmarks.context_step [--devices 8] [--length 524288] [--json FILE]

It builds the training step of `python -m train.finetune` (`train.step.make_train_step`:
chunked loss, gradients, AdamW update) for a tiny LLaMA-shaped model with CCA attention, on a
mesh whose context axis holds every device (`--mesh context=N`), and runs it on one sequence
of `--length` tokens. Per device it reports XLA's buffer assignment of the compiled step
(arguments, outputs, temporaries: the peak a device needs), and the same figure for the
step compiled for one device holding the whole sequence (compiled only, not run), so the
ratio shows what the split saves. The process's peak resident memory covers all devices (on
the CPU they share one process).

The model's sizes default to ones a 2-core CPU steps through in minutes; CCA's cost per
query grows with L / g, so a long sequence takes a larger group here than the paper's 16.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.context_step",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8, help="CPU devices, all on the context axis")
    parser.add_argument("--length", type=int, default=524288, help="tokens in the sequence")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--window-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", default="2:1", metavar="H:HKV")
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--loss-chunk", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=2, help="steps to run (the step is compiled ahead, so every step times only work)")
    parser.add_argument("--no-single", action="store_true",
                        help="skip compiling the one-device step for comparison")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the numbers here")
    args = parser.parse_args(argv)
    for name in ("devices", "length", "group_size", "window_size", "layers", "hidden",
                 "head_dim", "vocab", "loss_chunk", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        H, Hkv = (int(x) for x in args.heads.split(":"))
    except ValueError:
        parser.error(f"--heads must look like H:HKV, got {args.heads!r}")
    if args.length % (args.devices * args.group_size):
        parser.error(f"--length must be a multiple of --devices x --group-size "
                     f"({args.devices * args.group_size})")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from cca_jax import LlamaConfig, LlamaForCausalLM
    from cca_jax.params import str_keys
    from train.mesh import describe_mesh, make_mesh
    from train.sharding import logical_axes_of, param_shardings, rules_for, state_shardings
    from train.step import ModelFactory, make_optimizer, make_train_step

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=H, num_key_value_heads=Hkv, head_dim=args.head_dim,
                         max_position_embeddings=args.length, attention="cca",
                         group_size=args.group_size, window_size=args.window_size,
                         remat="full")
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    params = str_keys(nnx.to_pure_dict(nnx.state(LlamaForCausalLM(config, rngs=nnx.Rngs(0)),
                                                 nnx.Param)))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    tokens = np.random.default_rng(0).integers(0, args.vocab, (1, 1, args.length + 1),
                                               dtype=np.int32)
    tx, _ = make_optimizer(1e-4, 0, 1.0, 0.0)
    factory = ModelFactory(abstract)

    def build(mesh):
        rules, _ = rules_for(config, mesh)
        p_sh = param_shardings(params, logical_axes_of(abstract), mesh, rules)
        o_sh = state_shardings(jax.eval_shape(tx.init, params), p_sh, mesh)
        b_sh = NamedSharding(mesh, P(None, None, None))
        step = make_train_step(factory, tx, chunk=args.loss_chunk, param_shardings=p_sh,
                               opt_shardings=o_sh, batch_sharding=b_sh, mesh=mesh)
        return mesh, rules, p_sh, o_sh, b_sh, step

    def memory(compiled) -> dict:
        m = compiled.memory_analysis()
        out = {k: int(getattr(m, k + "_in_bytes")) for k in
               ("argument_size", "output_size", "temp_size", "alias_size")}
        out["peak"] = out["argument_size"] + out["output_size"] + out["temp_size"] - out["alias_size"]
        return out

    results = {"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
               "backend": jax.default_backend(), "devices": args.devices,
               "length": args.length, "params": n_params,
               "config": {"layers": args.layers, "hidden": args.hidden, "heads": H,
                          "kv_heads": Hkv, "head_dim": args.head_dim, "vocab": args.vocab,
                          "group_size": args.group_size, "window_size": args.window_size,
                          "remat": "full", "loss_chunk": args.loss_chunk}}
    sizes = (1, 1, 1, args.devices)
    print(f"{describe_mesh(sizes)}; {n_params:,} parameters, one sequence of "
          f"{args.length:,} tokens, g={args.group_size}, w={args.window_size}", flush=True)
    mesh, rules, p_sh, o_sh, b_sh, step = build(make_mesh(sizes))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        placed = jax.device_put(params, p_sh)
        opt = jax.jit(tx.init, out_shardings=o_sh)(placed)
        batch = jax.device_put(tokens, b_sh)
        t0 = time.perf_counter()
        compiled = step.lower(placed, opt, batch).compile()
        results["compile_s"] = time.perf_counter() - t0
        results["per_device"] = memory(compiled)
        hlo = compiled.as_text()
        results["collectives"] = {kind: hlo.count(kind) for kind in
                                  ("all-gather", "collective-permute", "all-reduce",
                                   "reduce-scatter")}
        print(f"compiled in {results['compile_s']:.1f} s; per device: "
              f"{results['per_device']['peak'] / 2**20:,.1f} MiB "
              f"(temporaries {results['per_device']['temp_size'] / 2**20:,.1f} MiB)", flush=True)
        times = []
        for i in range(args.steps):
            t0 = time.perf_counter()
            placed, opt, metrics = compiled(placed, opt, batch)
            loss = float(metrics["loss"])
            times.append(time.perf_counter() - t0)
            print(f"step {i + 1}: loss {loss:.4f}, grad norm {float(metrics['grad_norm']):.4f}, "
                  f"{times[-1]:.1f} s ({args.length / times[-1]:,.0f} tokens/s)", flush=True)
        results["step_s"] = times
        results["loss"] = loss
    results["peak_rss_bytes_all_devices"] = resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * 1024
    if not args.no_single:
        devices = np.array(jax.devices()[:1]).reshape(1, 1, 1, 1)
        single, rules1, p1, o1, b1, step1 = build(
            jax.sharding.Mesh(devices, ("data", "fsdp", "tensor", "context")))
        with jax.set_mesh(single), nnx.logical_axis_rules(rules1):
            shapes = (jax.eval_shape(lambda: params), jax.eval_shape(tx.init, params),
                      jax.ShapeDtypeStruct(tokens.shape, tokens.dtype))
            lowered = step1.lower(*(jax.tree.map(
                lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), t, shs)
                for t, shs in zip(shapes, (p1, o1, b1))))
            results["one_device"] = memory(lowered.compile())
        ratio = results["one_device"]["peak"] / results["per_device"]["peak"]
        results["one_device_over_per_device"] = ratio
        print(f"the same step on one device would need "
              f"{results['one_device']['peak'] / 2**20:,.1f} MiB: {ratio:.2f}x a context "
              "shard's", flush=True)
    print(json.dumps({k: v for k, v in results.items() if k != "config"}, indent=1))
    if args.json:
        from cca_jax.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
