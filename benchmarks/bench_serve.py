"""Serving benchmark of cached generation on a GPU (a benchmark, not a test):

    python -m benchmarks.bench_decode --shape llama2-7b [--lengths 8192 32768 131072]
        [--batches 1 8 32 max] [--batch-lengths 32768 131072] [--new-tokens 64]
        [--prefill-repeats N] [--json F]

Random weights of `benchmarks.shapes.SHAPES[--shape]` in bf16, g = 16, w = 1024. For each
attention kind (one model each):

1. exactness on the GPU: the cached logits of 8 greedy tokens after a 3,000-token prompt
   (prefilled in chunks of 1,024 columns) against the uncached forward pass of the same
   sequence, as relative L2 errors per token, and chunked against one-shot prefill;
2. B = 1 at each of --lengths: prefill seconds (the whole prompt, first token included),
   decode tokens/s, and the share of the bandwidth roofline: the bytes one decode step must
   read (all weights, plus each row's visible cache: a full cache's t + 1 keys and values,
   CCA's c(t) core tokens per query head and its raw window) over the copy bandwidth
   (--bandwidth, default 4.3 TB/s: DEFAULT_BANDWIDTH_TBPS), against the measured time per
   step;
3. batches at each of --batch-lengths: aggregate decode tokens/s at B = 1, 8, 32 and the
   largest batch that fits (`cca_jax.generate.largest_batch`). For these the caches hold
   random values of the right shape (decode speed depends on the cache's shape, not on its
   values; the results of 2026-12-04 copied one prefilled row instead, which needed room for
   two caches); `--prefill-batches B:L ...` runs real prefills of whole batches.
"""
from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cca_jax.config import DEFAULT_CCA

G, W = DEFAULT_CCA.group_size, DEFAULT_CCA.window_size   # run() takes --group-size / --window-size
SMOKE_MEMORY = (4 * 2 ** 30, 0)   # a pretend device for the CPU smoke run


# The roofline's bandwidth: a device-to-device copy on this H200 kind moves about 4.3 TB/s
# counting bytes read and written (the device tool's KINDS.md, PyTorch, 8.6 GB in 2.0 ms).
# Measuring it from JAX here failed twice (2.7 TB/s for one pass per call with dispatch
# included; 64 TB/s for a loop of element-wise passes that XLA collapsed even with a traced
# trip count), so it is an argument: --bandwidth TB/s.
DEFAULT_BANDWIDTH_TBPS = 4.3


def step_bytes(config, attention: str, batch: int, position: int, weight_bytes: int) -> int:
    """Bytes a decode step at `position` must read: the weights once, and each row's
    visible cache (keys and values)."""
    from cca_kernels.visibility import visible_core_count

    item = jnp.dtype(config.dtype).itemsize
    H, Hkv, d = config.num_attention_heads, config.kv_heads, config.head_size
    if attention == "full":
        per_layer = (position + 1) * Hkv * d * 2 * item
    else:
        c = visible_core_count(position, G, W)
        per_layer = (c * H * d * 2 + (position + 1 - c * G) * Hkv * d * 2) * item
    return weight_bytes + batch * config.num_hidden_layers * per_layer


def _is_oom(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def check_exactness(model, attention: str, prompt: int = 3000, new: int = 8) -> dict:
    """Cached against uncached logits (relative L2 per token) and chunked (1,024 columns,
    or prompt // 3) against one-shot prefill."""
    from cca_jax.generate import generate

    config = model.config
    ids = np.asarray(jax.random.randint(jax.random.PRNGKey(7), (1, prompt), 0,
                                        config.vocab_size), np.int32)
    out, cached = generate(model, ids, new, attention=attention, return_logits=True,
                           prefill_chunk=min(1024, prompt // 3))
    _, one_shot = generate(model, ids, 1, attention=attention, return_logits=True,
                           prefill_chunk=prompt)
    from flax import nnx

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    full = np.asarray(forward(state, jnp.asarray(out[:, :prompt + new - 1])))
    reference = full[0, prompt - 1:prompt + new - 1]
    rel = [float(np.linalg.norm(cached[0, i] - reference[i]) / np.linalg.norm(reference[i]))
           for i in range(new)]
    chunked_vs_one_shot = float(np.linalg.norm(cached[0, 0] - one_shot[0, 0])
                                / np.linalg.norm(one_shot[0, 0]))
    argmax_agree = float(np.mean(np.argmax(cached[0], -1) == np.argmax(reference, -1)))
    return {"attention": attention, "prompt": prompt, "new_tokens": new,
            "max_rel_l2_cached_vs_uncached": max(rel), "rel_l2_per_token": rel,
            "rel_l2_chunked_vs_one_shot_prefill": chunked_vs_one_shot,
            "argmax_agreement": argmax_agree}


def run_generation(model, attention: str, batch: int, length: int, new_tokens: int,
                   bandwidth: float, weight_bytes: int, *, prefill_chunk=None,
                   warm: bool = True, repeats: int = 1) -> dict:
    """A real prefill of `batch` prompts of `length` tokens, then decoding; with `warm` one
    untimed generation first; `repeats` timed generations, the prefill their median."""
    from cca_jax.generate import CachedGeneration

    config = model.config
    ids = np.asarray(jax.random.randint(jax.random.PRNGKey(length + batch), (batch, length), 0,
                                        config.vocab_size), np.int32)
    row = {"attention": attention, "batch": batch, "length": length, "mode": "real prefill"}
    try:
        session = CachedGeneration(model, ids, new_tokens + 1, attention=attention,
                                   prefill_chunk=prefill_chunk)
        row["prefill_chunk"] = session.chunk_width
        session.compile()
        row["compile_s"] = session.stats.compile_s
        if warm:
            for _ in session:
                pass
        prefills = []
        for _ in range(max(1, repeats)):
            for _ in session:
                pass
            prefills.append(session.stats.prefill_s)
    except Exception as error:  # out of memory is a result here, anything else is not
        if not _is_oom(error):
            raise
        row["error"] = "out of memory"
        return row
    s = session.stats
    row.update(prefill_s=float(np.median(prefills)), prefill_s_runs=prefills,
               prefill_chunks=s.prefill_chunks,
               cache_gib=s.cache_bytes / 2 ** 30,
               decode_tokens_per_s=s.decode_tokens_per_s,
               aggregate_tokens_per_s=batch * s.decode_tokens_per_s)
    _roofline(row, config, attention, batch, length, new_tokens, bandwidth, weight_bytes)
    return row


def _roofline(row, config, attention, batch, length, new_tokens, bandwidth, weight_bytes):
    ms = 1e3 / row["decode_tokens_per_s"]
    bytes_ = step_bytes(config, attention, batch, length + new_tokens // 2, weight_bytes)
    row.update(ms_per_step=ms, bytes_per_step=bytes_, roofline_ms=1e3 * bytes_ / bandwidth,
               roofline_share=1e3 * bytes_ / bandwidth / ms)


def random_cache(spec, length: int, seed: int = 0):
    """A cache of `spec` whose rows all hold `length` tokens of random values (normal keys,
    values and core tokens): what a decode step reads
    has the shape of a real prefill's, and no prefill is needed. Every leaf is drawn by its
    own jitted call, so only the cache itself is ever allocated."""
    from cca_jax import cache as cache_lib

    shapes = jax.eval_shape(lambda: cache_lib.init_cache(spec))
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    filled = []
    for key, leaf in zip(keys, leaves):
        if jnp.issubdtype(leaf.dtype, jnp.integer):          # the lengths
            filled.append(jnp.full(leaf.shape, length, leaf.dtype))
        else:
            filled.append(jax.jit(lambda k, s=leaf.shape, t=leaf.dtype:
                                  jax.random.normal(k, s, t))(key))
    return jax.tree_util.tree_unflatten(treedef, filled)


def run_batch_decode(model, attention: str, batch: int, length: int, new_tokens: int,
                     bandwidth: float, weight_bytes: int) -> dict:
    """Decode throughput at `batch` rows whose caches hold `length` tokens of random values
    (decode speed depends on the cache's shape, not on its values; `random_cache`), then
    `new_tokens` decode steps (32 per device call), timed after a warm call."""
    from flax import nnx

    from cca_jax import cache as cache_lib
    from cca_jax.cache import resolve_decode_implementation
    from cca_jax.generate import _decode_chunk_jit

    config = model.config
    row = {"attention": attention, "batch": batch, "length": length, "mode": "random cache"}
    spec = cache_lib.CacheSpec.for_model(config, batch, length + 2 * new_tokens + 64,
                                         attention)
    graphdef, state = nnx.split(model)
    try:
        cache = random_cache(spec, length)
        tokens = jax.random.randint(jax.random.PRNGKey(1), (batch,), 0, config.vocab_size)
        impl = resolve_decode_implementation("auto", config.head_size)
        done = jnp.zeros((batch,), bool)
        key = jax.random.PRNGKey(0)
        args = dict(steps=32, implementation=impl, interpret=False, keep_logits=False)
        zero, eos, pad = jnp.float32(0), jnp.array([-1], jnp.int32), jnp.int32(0)
        out, taken, cache, tokens, done, _ = _decode_chunk_jit(
            graphdef, state, cache, tokens, done, key, jnp.int32(1), jnp.int32(32), zero,
            zero, eos, pad, **args)
        jax.block_until_ready(out)
        start = time.perf_counter()
        steps = 0
        while steps < new_tokens:
            out, taken, cache, tokens, done, _ = _decode_chunk_jit(
                graphdef, state, cache, tokens, done, key, jnp.int32(33 + steps),
                jnp.int32(32), zero, zero, eos, pad, **args)
            np.asarray(out)
            steps += 32
        elapsed = time.perf_counter() - start
    except Exception as error:
        if not _is_oom(error):
            raise
        row["error"] = "out of memory"
        return row
    row.update(cache_gib=cache_lib.cache_bytes_for(spec) / 2 ** 30,
               decode_tokens_per_s=steps / elapsed,
               aggregate_tokens_per_s=batch * steps / elapsed)
    _roofline(row, config, attention, batch, length + 32, steps, bandwidth, weight_bytes)
    del cache
    return row


def _fmt(row) -> str:
    if "error" in row:
        return (f"| {row['attention']} | {row['batch']} | {row['length']} | {row['mode']} | "
                f"{row['error']} | | | | |")
    prefill = f"{row['prefill_s']:.3f}" if "prefill_s" in row else "-"
    return (f"| {row['attention']} | {row['batch']} | {row['length']} | {row['mode']} | "
            f"{prefill} | {row['decode_tokens_per_s']:.1f} | "
            f"{row['aggregate_tokens_per_s']:.0f} | {row['ms_per_step']:.2f} / "
            f"{row['roofline_ms']:.2f} ({100 * row['roofline_share']:.0f}%) | "
            f"{row['cache_gib']:.2f} |")


HEADER = ("| attention | B | prompt | mode | prefill (s) | decode tok/s per seq | aggregate tok/s "
          "| ms/step measured / roofline (share) | cache GiB |\n"
          "|---|---:|---:|---|---:|---:|---:|---:|---:|")


def run(args) -> int:
    global G, W
    from flax import nnx

    from cca_jax import LlamaConfig, LlamaForCausalLM
    from cca_jax.generate import largest_batch
    from benchmarks.shapes import TINY_SHAPE
    from benchmarks.shapes import SHAPES

    gpu = jax.default_backend() == "gpu"
    shapes = dict(SHAPES, tiny=TINY_SHAPE)
    if args.shape not in shapes:
        print(f"--shape must be one of {', '.join(shapes)}", file=sys.stderr)
        return 2
    if not gpu and not args.smoke:
        print("the serving benchmark (--shape) times a GPU; this backend is "
              f"{jax.default_backend()!r}. For a smoke run on the CPU pass --smoke (tiny "
              "model, tiny lengths).", file=sys.stderr)
        return 2
    G, W = args.group_size, args.window_size
    memory = None
    if args.smoke:
        args.shape, G, W = "tiny", 4, 64
        args.lengths, args.batch_lengths, args.new_tokens = [200], [150], 32
        args.prefill_batches = ["3:130"]
        memory = None if gpu else SMOKE_MEMORY
    device = jax.devices()[0].device_kind
    tbps = DEFAULT_BANDWIDTH_TBPS if args.bandwidth is None else args.bandwidth
    bandwidth = tbps * 1e12
    print(f"device: {device}, jax {jax.__version__}; roofline bandwidth {tbps} TB/s "
          f"(read + write, --bandwidth); shape {args.shape}, bf16, g={G}, w={W}", flush=True)
    results = {"meta": {"device": device, "jax": jax.__version__,
                        "date": time.strftime("%Y-%m-%d"), "shape": args.shape,
                        "roofline_bandwidth": bandwidth, "argv": sys.argv[1:]},
               "exactness": [], "rows": []}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)

    for attention in args.attention:
        config = LlamaConfig(**shapes[args.shape], attention=attention, group_size=G,
                             window_size=W, dtype="bfloat16", param_dtype="bfloat16",
                             attention_implementation="pallas" if gpu else "xla")
        model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
        weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        if not args.skip_exactness:
            check = (check_exactness(model, attention, prompt=90, new=4) if args.smoke
                     else check_exactness(model, attention))
            results["exactness"].append(check)
            print(f"[{attention}] exactness: cached vs uncached logits, max rel L2 "
                  f"{check['max_rel_l2_cached_vs_uncached']:.2e}, argmax agreement "
                  f"{check['argmax_agreement']:.2f}; chunked vs one-shot prefill "
                  f"{check['rel_l2_chunked_vs_one_shot_prefill']:.2e}", flush=True)
            save()
        for length in args.lengths:
            # Long prompts run once (compiled ahead, so that run is warm in that sense).
            row = run_generation(model, attention, 1, length, args.new_tokens, bandwidth,
                                 weight_bytes, warm=length < 65536,
                                 repeats=args.prefill_repeats)
            results["rows"].append(row)
            print(_fmt(row), flush=True)
            save()
        for spec in args.prefill_batches:
            batch, length = (int(x) for x in spec.split(":"))
            row = run_generation(model, attention, batch, length, args.new_tokens, bandwidth,
                                 weight_bytes, warm=False)
            results["rows"].append(row)
            print(_fmt(row), flush=True)
            save()
        for length in args.batch_lengths:
            most = largest_batch(config, length + 2 * args.new_tokens + 64, attention, memory)
            batches = sorted({most if b == "max" else int(b) for b in args.batches})
            for batch in batches:
                if batch < 1 or batch > most:
                    row = {"attention": attention, "batch": batch, "length": length,
                           "mode": "random cache",
                           "error": f"skipped: largest batch that fits is {most}"}
                else:
                    row = run_batch_decode(model, attention, batch, length, args.new_tokens,
                                           bandwidth, weight_bytes)
                row["largest_batch"] = most
                results["rows"].append(row)
                print(_fmt(row), flush=True)
                save()
        del model
    print()
    print(HEADER)
    for row in results["rows"]:
        print(_fmt(row))
    save()
    return 0
