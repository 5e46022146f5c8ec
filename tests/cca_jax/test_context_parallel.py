"""Context parallelism (cca_jax.context): CCA over a sequence split on a mesh axis equals the
unsharded op, forward (float32, 1e-5 relative) and q/k/v gradients (1e-4), for GQA, ragged
lengths (padded to whole groups per shard), w % g != 0, a halo longer than a shard (several
hops), g = w = 1, the sequence axis composed with a batch axis, in the contiguous and the
balanced (zigzag) layouts, with the blocked engine and (interpret mode) the Pallas kernels
per shard. The sharded runs need 8
CPU devices, which must be set before jax starts: they run in one child process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cca_jax.context import halo_length

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp
    from cca_jax import cca_attention
    from cca_jax.context import cca_attention_context_parallel

    assert jax.device_count() == 8
    auto = (jax.sharding.AxisType.Auto,)
    cases = json.loads(sys.argv[1])
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    results = []
    for case in cases:
        B, L, H, Hkv, d, g, w = case["shape"]
        sizes, names = case["mesh"]
        mesh = jax.make_mesh(tuple(sizes), tuple(names), axis_types=auto * len(names))
        batch = "data" if "data" in names else None
        keys = jax.random.split(jax.random.PRNGKey(case["seed"]), 4)
        q = jax.random.normal(keys[0], (B, L, H, d))
        k = jax.random.normal(keys[1], (B, L, Hkv, d))
        v = jax.random.normal(keys[2], (B, L, Hkv, d))
        dout = jax.random.normal(keys[3], (B, L, H, d))
        plain = lambda q, k, v: cca_attention(q, k, v, group_size=g, window_size=w,
                                              implementation="xla")
        impl = case.get("impl", "xla")
        sharded = lambda q, k, v: cca_attention_context_parallel(
            q, k, v, mesh=mesh, group_size=g, window_size=w, batch_axes=batch,
            chunk_size=case["chunk"], layout=case.get("layout", "contiguous"),
            implementation=impl, interpret=impl == "pallas")
        loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v) * dout))
        want, got = plain(q, k, v), jax.jit(sharded)(q, k, v)
        want_g = jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
        got_g = jax.jit(jax.grad(loss(sharded), argnums=(0, 1, 2)))(q, k, v)
        hlo = jax.jit(sharded).lower(q, k, v).as_text()
        results.append({"forward": rel(got, want),
                        "grads": [rel(a, b) for a, b in zip(got_g, want_g)],
                        "all_gathers": hlo.count("all_gather") + hlo.count("all-gather"),
                        "permutes": hlo.count("ppermute") + hlo.count("collective_permute")
                                    + hlo.count("collective-permute")})
    print(json.dumps(results))
''')

# (B, L, H, Hkv, d, g, w), mesh, chunk; shards are L / 8 long (rounded up to whole groups).
CASES = [
    {"shape": [2, 256, 4, 2, 16, 4, 8], "mesh": [[8], ["context"]], "chunk": 16,
     "seed": 0},                                                # GQA, halo 12 < shard 32
    {"shape": [1, 123, 4, 4, 8, 4, 10], "mesh": [[8], ["context"]], "chunk": 8,
     "seed": 1},                                                # ragged L, w % g != 0
    {"shape": [1, 128, 2, 1, 8, 4, 40], "mesh": [[8], ["context"]], "chunk": 16,
     "seed": 2},                                                # halo 44 > shard 16: 3 hops
    {"shape": [1, 64, 2, 2, 8, 1, 1], "mesh": [[8], ["context"]], "chunk": 4,
     "seed": 3},                                                # g = w = 1: no halo
    {"shape": [4, 200, 4, 2, 8, 8, 24], "mesh": [[2, 4], ["data", "context"]], "chunk": 16,
     "seed": 4},                                                # batch x context axes
    # The balanced layout: shard i holds pieces i and 15 - i (halos from either side).
    {"shape": [2, 256, 4, 2, 16, 4, 8], "mesh": [[8], ["context"]], "chunk": 8,
     "seed": 5, "layout": "zigzag"},                            # halo 12 < piece 16
    {"shape": [1, 123, 4, 4, 8, 4, 10], "mesh": [[8], ["context"]], "chunk": 8,
     "seed": 6, "layout": "zigzag"},                            # ragged, w % g != 0
    {"shape": [1, 128, 2, 1, 8, 4, 40], "mesh": [[8], ["context"]], "chunk": 8,
     "seed": 7, "layout": "zigzag"},                            # halo 44 > piece 8: 6 hops
    {"shape": [4, 200, 4, 2, 8, 8, 24], "mesh": [[2, 4], ["data", "context"]], "chunk": 16,
     "seed": 8, "layout": "zigzag"},
    # The Pallas kernels per shard (interpret mode: tiny shapes), their traced query offset.
    {"shape": [1, 128, 2, 1, 8, 4, 8], "mesh": [[8], ["context"]], "chunk": 16,
     "seed": 9, "impl": "pallas"},                              # GQA, halo 12 < shard 16
    {"shape": [1, 61, 2, 1, 8, 4, 21], "mesh": [[8], ["context"]], "chunk": 16,
     "seed": 10, "impl": "pallas"},                             # ragged, w % g, 3 hops
    {"shape": [1, 128, 2, 2, 8, 4, 10], "mesh": [[8], ["context"]], "chunk": 16,
     "seed": 11, "impl": "pallas", "layout": "zigzag"},         # halo 12 > piece 8
    {"shape": [1, 61, 2, 1, 8, 4, 21], "mesh": [[8], ["context"]], "chunk": 16,
     "seed": 12, "impl": "pallas", "layout": "zigzag"},         # ragged, w % g, 6 hops
]


def test_halo_length_is_w_plus_g_minus_2_in_whole_groups():
    assert halo_length(16, 1024) == 1040
    assert halo_length(4, 10) == 12
    assert halo_length(4, 8) == 12
    assert halo_length(1, 1) == 0
    assert halo_length(1, 5) == 4
    with pytest.raises(ValueError, match="group_size"):
        halo_length(0, 8)
    with pytest.raises(ValueError, match="window_size"):
        halo_length(4, 1.5)


@pytest.fixture(scope="module")
def sharded_run() -> subprocess.CompletedProcess:
    """Every case of CASES, the XLA and the Pallas ones, in one process with 8 CPU devices
    (the two tests below share its interpreter and jax start-up)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES)], env=env,
                          capture_output=True, text=True, timeout=600)


def _check_sharded_equals_unsharded(proc, impl):
    """The results of the cases of `impl` ("xla" or "pallas") in the shared run."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(CASES)
    checked = [(case, got) for case, got in zip(CASES, results)
               if case.get("impl", "xla") == impl]
    assert checked
    for case, got in checked:
        assert got["forward"] < 1e-5, (case, got)
        assert max(got["grads"]) < 1e-4, (case, got)
        # Core tokens travel by all-gather; halos by ppermute (none when the halo is empty).
        assert got["all_gathers"] >= 2, (case, got)
        g, w = case["shape"][5:]
        assert (got["permutes"] > 0) == (halo_length(g, w) > 0), (case, got)


def test_sharded_equals_unsharded_forward_and_gradients(sharded_run):
    _check_sharded_equals_unsharded(sharded_run, "xla")


def test_sharded_pallas_kernels_equal_unsharded(sharded_run):
    """The kernels per shard, in interpret mode (about a minute on 2 CPU cores)."""
    _check_sharded_equals_unsharded(sharded_run, "pallas")


def test_zigzag_order_and_the_balance_it_buys():
    import numpy as np

    from cca_jax.context import shard_work, zigzag_order

    order = zigzag_order(16, 2)   # pieces of 4: shard 0 holds pieces 0 and 3, shard 1 1 and 2
    assert order.tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]
    assert sorted(order.tolist()) == list(range(16))
    # Work per shard at 128K over 8 shards (g=16, w=1024): contiguous shards are 71% above
    # the mean at the last one; the zigzag layout is within 0.1%.
    for layout, low, high in (("contiguous", 0.5, 1.0), ("zigzag", 0.0, 0.001)):
        work = shard_work(131072, 8, 16, 1024, layout)
        assert work.sum() == shard_work(131072, 1, 16, 1024).sum()
        assert low <= work.max() / work.mean() - 1 <= high, (layout, work)
    m = np.arange(40)
    c = np.maximum(0, (m + 1 - 8) // 4)
    assert shard_work(40, 2, 4, 8).tolist() == [int((c + m + 1 - 4 * c)[:20].sum()),
                                                int((c + m + 1 - 4 * c)[20:].sum())]
    with pytest.raises(ValueError, match="2 \\* n_shards"):
        zigzag_order(20, 3)
    with pytest.raises(ValueError, match="layout"):
        shard_work(16, 2, 4, 8, "striped")


def test_bad_arguments_are_named_before_any_compute():
    import jax
    import jax.numpy as jnp

    from cca_jax.context import cca_attention_context_parallel

    mesh = jax.make_mesh((1,), ("context",))
    q = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="axis_name"):
        cca_attention_context_parallel(q, q, q, mesh=mesh, group_size=4, window_size=8,
                                       axis_name="sequence")
    with pytest.raises(ValueError, match="k and v"):
        cca_attention_context_parallel(q, q[:, :4], q[:, :4], mesh=mesh, group_size=4,
                                       window_size=8)
    with pytest.raises(ValueError, match="group_size"):
        cca_attention_context_parallel(q, q, q, mesh=mesh, group_size=0, window_size=8)
    with pytest.raises(ValueError, match="layout"):
        cca_attention_context_parallel(q, q, q, mesh=mesh, group_size=4, window_size=8,
                                       layout="striped")
    with pytest.raises(ValueError, match="implementation"):
        cca_attention_context_parallel(q, q, q, mesh=mesh, group_size=4, window_size=8,
                                       implementation="reference")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="interpret=True"):
            cca_attention_context_parallel(q, q, q, mesh=mesh, group_size=4, window_size=8,
                                           implementation="pallas")
        with pytest.raises(ValueError, match="interpret=True only"):
            cca_attention_context_parallel(q, q, q, mesh=mesh, group_size=4, window_size=8,
                                           interpret=True)


def _cuda_lowering_available() -> bool:
    import jax
    import jax.numpy as jnp
    try:
        jax.jit(lambda x: x + 1).trace(jnp.zeros(4)).lower(lowering_platforms=("cuda",))
        return True
    except Exception:
        return False


@pytest.mark.parametrize("layout,axis_type,kernels", [("contiguous", "Auto", 4),
                                                      ("zigzag", "Auto", 8),
                                                      ("contiguous", "Explicit", 4)])
def test_gpu_path_lowers_to_the_kernels(layout, axis_type, kernels, monkeypatch):
    """On a GPU the op runs the Pallas kernels per shard with the shard's traced query offset
    (4 per piece: forward, dq, dk/dv, dcore), under shard_map's check of varying axes: the
    gradient of the op lowered for 8 abstract H100s (the Triton compilation needs a GPU)."""
    import jax
    import jax.numpy as jnp

    from cca_jax import context
    from cca_kernels import cca_common
    if not _cuda_lowering_available():
        pytest.skip("no CUDA cross-lowering here")
    monkeypatch.setattr(cca_common, "_device_kind", lambda: "nvidia h100 80gb hbm3")
    # What "auto" resolves to on a GPU.
    monkeypatch.setattr(context, "resolve_implementation", lambda *a: "pallas")
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                       platform="cuda")
    mesh = jax.sharding.AbstractMesh((8,), ("context",), abstract_device=h100,
                                     axis_types=(getattr(jax.sharding.AxisType, axis_type),))
    q = jax.ShapeDtypeStruct((1, 4096, 4, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 4096, 2, 64), jnp.bfloat16)

    def loss(q, k, v):
        out = context.cca_attention_context_parallel(q, k, v, mesh=mesh, group_size=16,
                                                     window_size=300, layout=layout)
        return out.astype(jnp.float32).sum()

    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == kernels
    assert text.count("all_gather") >= 2 and text.count("collective_permute") > 0
