"""Context parallelism in training: with the sequence split over the mesh axis "context"
(`--mesh ...xC` or `context=C`), a fine-tune step's loss and gradients equal the unsharded
run's (float32, 1e-5), composed with data / FSDP / tensor axes, in the zigzag and the
contiguous layout, for CCA (GQA, w % g != 0, a halo longer than a shard), full attention and
a hybrid. Runs in a subprocess with 8 CPU devices."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

from tests.train.conftest import REPO, finetune_env

SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from cca_jax import LlamaConfig, LlamaForCausalLM
    from cca_jax.layer import sequence_layout
    from cca_jax.params import str_keys
    from train.loss import token_nll
    from train.mesh import make_mesh, parse_mesh
    from train.sharding import logical_axes_of, param_shardings, rules_for, state_shardings
    from train.step import ModelFactory, make_optimizer, make_train_step

    assert jax.device_count() == 8
    CHUNK = 8

    def setup(config):
        model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
        params = str_keys(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        return nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0))), params

    def run(config, tokens, sizes, layout="zigzag"):
        with sequence_layout(layout):
            return run_in_layout(config, tokens, sizes)

    def run_in_layout(config, tokens, sizes):
        """(loss, grads, step metrics) of one fine-tune step on this mesh (None: no mesh)."""
        abstract, params = setup(config)
        factory = ModelFactory(abstract)
        loss = lambda p, t: token_nll(factory(p), t, CHUNK)[0]
        tx, _ = make_optimizer(1e-3, 0, 1.0, 0.0)
        mesh = make_mesh(sizes or (1, 1, 1, 1))
        rules, _ = rules_for(config, mesh)
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules if sizes else ()):
            value, grads = jax.jit(jax.value_and_grad(loss))(params, tokens)
            jaxpr = str(jax.make_jaxpr(loss)(params, tokens))
            logical = logical_axes_of(abstract)
            p_sh = param_shardings(params, logical, mesh, rules)
            o_sh = state_shardings(jax.eval_shape(tx.init, params), p_sh, mesh)
            batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1) or None
            batch_sharding = NamedSharding(mesh, P(None, batch_axes, None))
            step = make_train_step(factory, tx, chunk=CHUNK, param_shardings=p_sh,
                                   opt_shardings=o_sh, mesh=mesh, batch_sharding=batch_sharding)
            placed = jax.device_put(params, p_sh)
            opt = jax.jit(tx.init, out_shardings=o_sh)(placed)
            _, _, metrics = step(placed, opt, jax.device_put(tokens[None], batch_sharding))
        return float(value), grads, {k: float(v) for k, v in metrics.items()}, jaxpr

    unsharded = {}

    def check(name, config, tokens, sizes, collectives=True, layout="zigzag"):
        name = f"{name} ({layout})"
        if config not in unsharded:
            unsharded[config] = run(config, tokens, None)
        want_loss, want_grads, want_metrics, _ = unsharded[config]
        loss, grads, metrics, jaxpr = run(config, tokens, sizes, layout)
        assert abs(loss - want_loss) <= 1e-5 * abs(want_loss), (name, loss, want_loss)
        for key in ("loss", "grad_norm"):
            assert abs(metrics[key] - want_metrics[key]) <= 1e-5 * abs(want_metrics[key]), (
                name, key, metrics, want_metrics)
        worst = 0.0
        for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads),
                                jax.tree.leaves(want_grads)):
            g, w = np.asarray(g), np.asarray(w)
            scale = np.abs(w).max() + 1e-30
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * scale,
                                       err_msg=f"{name} {jax.tree_util.keystr(path)}")
            worst = max(worst, float(np.abs(g - w).max() / scale))
        assert "sharding_constraint" in jaxpr, name      # activations split along L
        if collectives:
            assert "ppermute" in jaxpr and "all_gather" in jaxpr, name
        print(f"ok {name}: loss {loss:.6f} (unsharded {want_loss:.6f}), largest gradient "
              f"difference {worst:.1e} of the largest entry", flush=True)

    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 129), 0, 64)   # 128 inputs
    cca = LlamaConfig(**base, attention="cca", group_size=4, window_size=6)
    check("context=8", cca, tokens, parse_mesh("context=8", 8))
    check("context=8", cca, tokens, parse_mesh("context=8", 8), layout="contiguous")
    check("fsdp=2,context=4", cca, tokens, parse_mesh("fsdp=2,context=4", 8))
    check("2x1x1x4 (data x context)", cca, tokens, parse_mesh("2x1x1x4", 8))
    check("tensor=2,context=4", cca, tokens, parse_mesh("tensor=2,context=4", 8))
    # w + g - 2 = 42 raw keys back: the halo spans three shards of 16 tokens.
    check("halo of 3 shards", LlamaConfig(**base, attention="cca", group_size=4,
                                          window_size=40), tokens, (1, 1, 1, 8))
    check("halo of 3 shards", LlamaConfig(**base, attention="cca", group_size=4,
                                          window_size=40), tokens, (1, 1, 1, 8),
          layout="contiguous")
    check("full attention", LlamaConfig(**base, attention="full"), tokens, (1, 1, 1, 8),
          collectives=False)
    hybrid = LlamaConfig(**base, attention="cca", group_size=4, window_size=6,
                         full_attention_layers=(1,))
    check("hybrid", hybrid, tokens, (1, 1, 1, 8))
    check("hybrid", hybrid, tokens, (1, 1, 1, 8), layout="contiguous")

    # A shard that is not whole groups: a clear error, not a silently unsplit sequence.
    try:
        run(cca, tokens[:, :121], (1, 1, 1, 8), "contiguous")   # 120 inputs: shards of 15
    except ValueError as error:
        assert "whole groups" in str(error) and "group_size 4" in str(error), error
        print("ok error:", error)
    else:
        raise AssertionError("a shard of 15 tokens with g = 4 was accepted")
    try:
        run(cca, tokens[:, :97], (1, 1, 1, 8))         # 96 inputs: pieces of 6
    except ValueError as error:
        assert "two pieces of whole groups" in str(error), error
        print("ok error:", error)
    else:
        raise AssertionError("zigzag pieces of 6 tokens with g = 4 were accepted")
    try:
        run(cca, tokens[:, :101], (1, 1, 1, 8))         # 100 inputs: not 8 equal shards
    except ValueError as error:
        assert "does not split into 8 equal shards" in str(error), error
        print("ok error:", error)
    else:
        raise AssertionError("100 tokens over 8 shards was accepted")
    print("context training ok")
''')


def test_context_parallel_step_equals_the_unsharded_step():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=finetune_env(8),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-6000:]
    assert "context training ok" in result.stdout
    print(result.stdout)


def test_finetune_cli_with_a_context_axis(tmp_path):
    """`python -m train.finetune --mesh context=8`: both layouts train (the same first loss),
    the mesh line says the sequence is split, and a --seq-len that does not split into whole
    groups per shard is refused before any compute."""
    from tests.train.conftest import run_finetune_sequence
    from tests.train.tiny import make_corpus, make_tiny_model

    model = make_tiny_model(tmp_path / "model")
    corpus = make_corpus(tmp_path / "corpus")
    common = ["--model", model, "--data", *corpus, "--seq-len", "64", "--group-size", "4",
              "--window-size", "8", "--batch-size", "2", "--steps", "2", "--warmup-steps", "1",
              "--eval-sequences", "0", "--no-export", "--mesh", "context=8"]
    layouts = ("zigzag", "contiguous")
    # The three runs in one 8-device process (the command line's main() once per run, its
    # output captured at the file-descriptor level): two launches' start-up saved.
    results = run_finetune_sequence(
        [("run", [*common, "--context-layout", layout, "--out", tmp_path / layout])
         for layout in layouts]
        + [("run", [*common, "--seq-len", "72", "--out", tmp_path / "bad"])],
        tmp_path / "sequence")
    first = {}
    for layout, result in zip(layouts, results):
        out = tmp_path / layout
        assert result.returncode == 0, result.stdout + result.stderr[-4000:]
        assert "every sequence split 8 ways along its length" in result.stdout
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
        first[layout] = metrics[0]["loss"]
    assert abs(first["zigzag"] - first["contiguous"]) <= 1e-5 * abs(first["contiguous"]), first
    bad = results[2]
    assert bad.returncode == 2, bad.stdout + bad.stderr[-2000:]
    assert "--seq-len 72 must be a multiple of 64 (8 shards x 2 pieces x group_size 4)" in (
        bad.stdout + bad.stderr), bad.stderr[-2000:]
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
