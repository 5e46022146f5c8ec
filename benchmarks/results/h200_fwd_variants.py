"""RECORD of the three forward-kernel runs of 2026-12-04 (cca_kernels/NOTES.md); not part of
the package. Run on a GPU from the repository root: PYTHONPATH=. PREFILL=0 python benchmarks/results/h200_fwd_variants.py
The kernel module no longer has the knobs these runs toggled (HEAVY_FIRST in runs 1-2, BRANCH
in run 3: rejected variants were removed), so today its "_block" and "_kernel" variants run
the same kept kernel.

Device call: forward-kernel variants (tiles, heavy-first order, NaN bookkeeping) against
cuDNN, then the 7B-shape prefill at short lengths with the best variant.

Times are per kernel call from a chain of calls in one jit (the output is the next query),
medians of 5 repeats after a warm-up. DRY=1 runs tiny shapes on the CPU (interpret).
"""
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, ".")
from cca_kernels import cca_common, cca_fwd  # noqa: E402
from cca_kernels.cca_common import Static  # noqa: E402
from cca_kernels.visibility import visible_core_count  # noqa: E402
from cca_jax.reference import pool_core_tokens  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/fwd_exp")
os.makedirs(OUT, exist_ok=True)
DRY = bool(os.environ.get("DRY"))
H, D, G, W = (4, 32, 4, 16) if DRY else (32, 128, 16, 1024)
LENGTHS = [int(x) for x in os.environ.get("LENGTHS", "128 256" if DRY else
                                          "2048 4096 8192 32768 131072").split()]
log = open(os.path.join(OUT, "fwd_exp.log"), "a")


def say(*a):
    line = " ".join(str(x) for x in a)
    print(line, flush=True)
    log.write(line + "\n")
    log.flush()


ORIG_STEP = cca_fwd._online_softmax_step


def step_no_nan(carry, scores, mask, values, exact, bookkeeping):
    """Measure-only: the masked blocks without the non-finite bookkeeping or its branch."""
    acc, m_prev, l_prev, seen = carry
    if mask is not None:
        scores = jnp.where(mask, scores, cca_common.MASK_VALUE)
    return ORIG_STEP((acc, m_prev, l_prev, seen), scores, None, values, exact, False)


base = cca_common.default_block_sizes(D, jnp.bfloat16, interpret=DRY)
T = dict
VARIANTS = [  # name, block changes, branch ("kernel"/"block"), nan bookkeeping
    ("default_block", {}, "block", True),
    ("default_kernel", {}, "kernel", True),
    ("default_nobranch", {}, "block", False),
    ("64x64w4s3_block", T(block_q=64, block_k=64, num_warps=4, num_stages=3), "block", True),
    ("64x64w4s3_kernel", T(block_q=64, block_k=64, num_warps=4, num_stages=3), "kernel", True),
    ("64x64w4s3_nobranch", T(block_q=64, block_k=64, num_warps=4, num_stages=3), "block", False),
    ("128x64w8s3_kernel", T(block_q=128, block_k=64, num_warps=8, num_stages=3), "kernel", True),
    ("64x64w4s2_kernel", T(block_q=64, block_k=64, num_warps=4, num_stages=2), "kernel", True),
    ("64x128w8s2_kernel", T(block_q=64, block_k=128, num_warps=8, num_stages=2), "kernel", True),
]
if DRY:
    VARIANTS = [(n, {k: min(v, 32) if k.startswith("block") else v for k, v in c.items()}, hf, nn)
                for n, c, hf, nn in VARIANTS[:4]]


def chain_ms(fn, args, n, reps=5):
    run = jax.jit(lambda q, *rest: lax.fori_loop(0, n, lambda i, q: fn(q, *rest), q))
    jax.block_until_ready(run(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(run(*args))
        times.append((time.perf_counter() - t) / n * 1e3)
    return statistics.median(times)


def pairs(L, causal):
    m = np.arange(L, dtype=np.int64)
    if causal:
        return int((m + 1).sum())
    c = np.maximum(0, (m + 1 - W) // G)
    return int((c + (m + 1 - c * G)).sum())


results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "date": time.strftime("%Y-%m-%d"), "kernel": [], "prefill": []}
for L in LENGTHS:
    keys = jax.random.split(jax.random.PRNGKey(L), 3)
    q = jax.random.normal(keys[0], (1, L, H, D), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, L, H, D), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, L, H, D), jnp.bfloat16)
    C = visible_core_count(L - 1, G, W)
    ck, cv = pool_core_tokens(q, k, v, group_size=G, scale=D ** -0.5, num_groups=C)
    ck, cv = ck.astype(q.dtype), cv.astype(q.dtype)
    n = max(3, 3 * 131072 // L) if not DRY else 2
    fl_cca, fl_full = 4 * D * H * pairs(L, False), 4 * D * H * pairs(L, True)
    if not DRY:
        t = chain_ms(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"), (q, k, v), n)
        results["kernel"].append(dict(L=L, variant="cudnn_causal", ms=t,
                                      tflops=fl_full / t / 1e9))
        say(f"L={L:>6} cudnn causal {t:8.3f} ms  {fl_full / t / 1e9:6.0f} TF/s")
    for name, change, heavy, nan in VARIANTS:
        blocks = dataclasses.replace(base, **change)
        Cp = max(blocks.core_multiple, -(-C // blocks.core_multiple) * blocks.core_multiple)
        pad = lambda x: jnp.pad(x, [(0, 0), (0, Cp - C), (0, 0), (0, 0)])
        st = Static(group_size=G, window_size=W, scale=D ** -0.5, ratio=1, has_core=C > 0,
                    blocks=blocks, interpret=DRY, exact_f32=False)
        cca_fwd.BRANCH = heavy
        cca_fwd._online_softmax_step = ORIG_STEP if nan else step_no_nan
        try:
            t = chain_ms(lambda q, k, v, a, b: cca_fwd.cca_forward(q, k, v, a, b, st)[0],
                         (q, k, v, pad(ck), pad(cv)), n)
            results["kernel"].append(dict(L=L, variant=name, ms=t, tflops=fl_cca / t / 1e9))
            say(f"L={L:>6} {name:>18} {t:8.3f} ms  {fl_cca / t / 1e9:6.0f} TF/s")
        except Exception as e:  # shared memory etc.
            say(f"L={L:>6} {name:>18} failed {type(e).__name__}: {str(e)[:150]}")
    cca_fwd.BRANCH, cca_fwd._online_softmax_step = "kernel", ORIG_STEP
    with open(os.path.join(OUT, "fwd_exp.json"), "w") as f:
        json.dump(results, f, indent=2)

# Best variant per length (exact ones only).
best = {}
for L in LENGTHS:
    rows = [r for r in results["kernel"] if r["L"] == L and r["variant"] not in
            ("cudnn_causal",) and not r["variant"].endswith("nobranch")]
    if rows:
        best[L] = min(rows, key=lambda r: r["ms"])["variant"]
say("best:", best)
results["best"] = best

# Prefill of the 7B shape at short lengths: full, CCA with the table, CCA with the best.
if os.environ.get("PREFILL", "1") == "1":
    from flax import nnx
    from cca_jax import LlamaConfig, LlamaForCausalLM
    from cca_jax.generate import CachedGeneration
    from benchmarks.shapes import SHAPES
    from benchmarks.shapes import TINY_SHAPE
    shape = TINY_SHAPE if DRY else SHAPES["llama2-7b"]
    orig_default = cca_common.default_block_sizes
    plens = [int(x) for x in os.environ.get("PLENS", "200" if DRY else "2048 4096 8192").split()]
    for attention in ("full", "cca"):
        config = LlamaConfig(**shape, attention=attention, group_size=G, window_size=W,
                             dtype="bfloat16", param_dtype="bfloat16",
                             attention_implementation="xla" if DRY else "pallas")
        model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
        arms = ["table"] if attention == "full" else os.environ.get("ARMS", "best").split()
        for L in plens:
            ids = np.asarray(jax.random.randint(jax.random.PRNGKey(L), (1, L), 0,
                                                config.vocab_size), np.int32)
            for arm in arms:
                if arm == "best" and L in best:
                    name = os.environ.get("BEST_" + str(L), best[L])
                    change = [c for n_, c, _, _ in VARIANTS if n_ == name][0]
                    cca_fwd.BRANCH = [h for n_, _, h, _ in VARIANTS if n_ == name][0]
                    cca_common.default_block_sizes = (
                        lambda *a, _c=change, **kw: dataclasses.replace(orig_default(*a, **kw),
                                                                        **_c))
                else:
                    name = "table"
                    cca_fwd.BRANCH = "kernel"
                    cca_common.default_block_sizes = orig_default
                jax.clear_caches()
                times = []
                session = CachedGeneration(model, ids, 1, attention=attention, prefill_chunk=L)
                session.compile()
                for _ in range(6):
                    for _ in session:
                        pass
                    times.append(session.stats.prefill_s)
                t = statistics.median(times[1:])
                results["prefill"].append(dict(attention=attention, L=L, arm=arm, variant=name,
                                               s=t, all=times))
                say(f"prefill {attention:>4} L={L:>6} {arm:>15} ({name}) {t * 1e3:8.2f} ms "
                    f"(min {min(times[1:]) * 1e3:.2f})")
                with open(os.path.join(OUT, "fwd_exp.json"), "w") as f:
                    json.dump(results, f, indent=2)
        del model
    cca_common.default_block_sizes = orig_default
say("done")
