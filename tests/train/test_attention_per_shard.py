"""The attention op runs once per shard (jax.shard_map over batch and heads) when a mesh and
the logical axis rules are active, and gives the same numbers as without a mesh. Runs in a
subprocess with 8 CPU devices."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.train.conftest import REPO, finetune_env

SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from cca_jax import LlamaConfig, LlamaForCausalLM, cca_attention
    from cca_jax.layer import attention_per_shard
    from train.mesh import make_mesh
    from train.sharding import LOGICAL_AXIS_RULES, rules_for
    from train.loss import token_nll

    assert jax.device_count() == 8
    config = LlamaConfig(vocab_size=64, num_attention_heads=4, num_key_value_heads=2,
                         attention="cca", group_size=4, window_size=8)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 41), 0, 64)
    loss = lambda m, t: token_nll(m, t, 16)[0]
    expected = float(loss(model, tokens))

    for sizes, want in (((1, 8, 1), "P('fsdp', None, None, None)"),
                        ((1, 4, 2), "P('fsdp', None, 'tensor', None)"),
                        ((2, 2, 2), "P(('data', 'fsdp'), None, 'tensor', None)"),
                        ((1, 2, 4), "P('fsdp', None, None, None)")):  # 2 kv heads: not split 4 ways
        mesh = make_mesh(sizes)
        rules, _ = rules_for(config, mesh)
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            batch = jax.device_put(tokens, NamedSharding(mesh, P(("data", "fsdp"))))
            jaxpr = str(jax.make_jaxpr(loss)(model, batch))
            got = float(nnx.jit(loss)(model, batch))
        assert jaxpr.count("shard_map") >= config.num_hidden_layers, sizes
        assert want in jaxpr, (sizes, want)
        assert abs(got - expected) < 1e-4 * abs(expected), (sizes, got, expected)
        print("sharded", sizes, got)

    # A mesh without rules: no shard_map (the partitioner decides).
    with jax.set_mesh(make_mesh((1, 8, 1))):
        assert "shard_map" not in str(jax.make_jaxpr(loss)(model, tokens))

    # The Pallas kernels (interpret mode on the CPU) run per shard as well, gradients included.
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    q = jax.random.normal(keys[0], (8, 48, 4, 16))
    k = jax.random.normal(keys[1], (8, 48, 2, 16))
    v = jax.random.normal(keys[2], (8, 48, 2, 16))
    def op(q, k, v, implementation, **kw):
        return cca_attention(q, k, v, group_size=4, window_size=8,
                             implementation=implementation, **kw)
    reference = op(q, k, v, "reference")
    mesh = make_mesh((1, 4, 2))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_AXIS_RULES):
        f = lambda q, k, v: attention_per_shard(
            lambda a, b, c: op(a, b, c, "pallas", interpret=True), q, k, v)
        assert "shard_map" in str(jax.make_jaxpr(f)(q, k, v))
        out = jax.jit(f)(q, k, v)
        grad = jax.jit(jax.grad(lambda q: f(q, k, v).sum()))(q)
    np.testing.assert_allclose(out, reference, rtol=2e-4, atol=2e-5)
    want_grad = jax.grad(lambda q: op(q, k, v, "reference").sum())(q)
    np.testing.assert_allclose(grad, want_grad, rtol=2e-3, atol=2e-4)
    print("pallas per shard ok")
''')


def test_attention_runs_per_shard_with_the_same_numbers():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=finetune_env(8),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pallas per shard ok" in result.stdout
