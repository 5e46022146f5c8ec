"""`train.attention_reach`: the far share of attention per layer, computed in query chunks.

The share is checked against a dense computation on random q, k (GQA, a chunk that divides
neither the length nor the window), against its closed form for uniform attention, and on a
tiny model whose layers are built to attend locally, uniformly, or in between, so that their
order is known. The command line runs once on a tiny converted model."""
from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cca_jax import LlamaConfig, LlamaForCausalLM
from cca_jax.config import parse_layer_indices
from train import attention_reach as R
from train.attention_reach import cli as reach_cli


def _dense_far_share(q, k, window):
    """float64 numpy: the whole [L, L] softmax at once."""
    B, L, H, d = q.shape
    k = np.repeat(k, H // k.shape[2], axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    i, j = np.arange(L)[:, None], np.arange(L)[None, :]
    scores = np.where(j <= i, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    far = np.where(j < i - window, probs, 0).sum(-1)          # [B, H, L]
    return far[:, :, window + 1:].mean(axis=(0, 2))


@pytest.mark.parametrize("L,window,chunk", [(50, 7, 16), (33, 20, 64), (40, 3, 1)])
def test_chunked_share_equals_the_dense_computation(L, window, chunk):
    rng = np.random.default_rng(L)
    q = rng.standard_normal((2, L, 4, 8))
    k = rng.standard_normal((2, L, 2, 8))
    ours = np.asarray(R.far_share(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                                  window, chunk))
    np.testing.assert_allclose(ours, _dense_far_share(q, k, window), atol=2e-6)
    assert ((ours >= 0) & (ours <= 1)).all()


def test_uniform_attention_has_the_closed_form_share():
    L, w = 64, 10
    q = jnp.zeros((1, L, 2, 8))
    k = jnp.asarray(np.random.default_rng(0).standard_normal((1, L, 2, 8)), jnp.float32)
    # Query i spreads 1 / (i + 1) over each key; i - w keys lie more than w back.
    expected = np.mean([(i - w) / (i + 1) for i in range(w + 1, L)])
    np.testing.assert_allclose(np.asarray(R.far_share(q, k, w, 24)), expected, rtol=1e-6)
    assert np.isnan(np.asarray(R.far_share(q[:, :w + 1], k[:, :w + 1], w))).all()


def _constructed_model(scales):
    """Layer i's queries and keys are the constant scales[i] * (1, ..., 1) (zero kernels,
    constant biases): 0 gives uniform attention; with a larger scale the RoPE-rotated score
    u . R(i - j) u peaks more sharply at j = i, so attention stays closer to the query."""
    config = LlamaConfig(num_hidden_layers=len(scales), num_attention_heads=4,
                         num_key_value_heads=2, hidden_size=64, head_dim=16, vocab_size=256,
                         attention_bias=True, attention="full")
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    for layer, scale in zip(model.layers, scales):
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            proj.kernel[...] = jnp.zeros_like(proj.kernel[...])
            proj.bias[...] = jnp.full_like(proj.bias[...], scale)
    return model


def test_layer_order_of_a_constructed_model():
    model = _constructed_model([6.0, 0.0, 1.5, 3.0])   # sharp, uniform, mild, sharper
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 96)), jnp.int32)
    shares = np.asarray(R.layer_far_shares(model, ids, window=16, chunk=40))
    assert shares.shape == (4, 4) and ((shares >= 0) & (shares <= 1)).all()
    mean = shares.mean(axis=1)
    assert np.argsort(-mean).tolist() == [1, 2, 3, 0], mean
    np.testing.assert_allclose(mean[1], np.mean([(i - 16) / (i + 1) for i in range(17, 96)]),
                               rtol=1e-5)
    assert R.top_layers(mean, 2) == (1, 2)
    assert R.top_layers([0.1, float("nan"), 0.3], 2) == (0, 2)


def test_text_windows_spread_over_documents():
    docs = [("a", np.arange(25)), ("b", np.arange(9)), ("c", np.arange(12))]
    windows = R.text_windows(docs, 10, 3)
    assert [name for name, _ in windows] == ["a@0", "c@0", "a@10"]
    assert all(len(ids) == 10 for _, ids in windows)


def test_cli_prints_the_table_and_the_flag_value(tiny, tmp_path, capsys):
    out = tmp_path / "reach.json"
    argv = ["--model", str(tiny.model), "--length", "64", "--window", "16", "--top", "1",
            "--samples", "2", "--sources", "--files", *map(str, tiny.eval), "--chunk", "24",
            "--json", str(out)]
    assert reach_cli.main(argv) == 0
    stdout = capsys.readouterr().out
    flag_line = stdout.strip().splitlines()[-1]
    assert flag_line.startswith("--full-attention-layers ")
    chosen = parse_layer_indices(flag_line.split()[1])
    report = json.loads(out.read_text())
    assert len(report["far_share"]) == 2 and report["top"] == list(chosen)
    assert chosen == (int(np.argmax(report["far_share"])),)
    assert all(0 <= s <= 1 for s in report["far_share"])
    for index in range(2):
        assert f"\n{index:>5}  " in stdout
    # Errors before the model is loaded.
    assert reach_cli.main(argv[:2] + ["--length", "16", "--window", "16"]) == 2
    assert "leaves no query" in capsys.readouterr().err
    assert reach_cli.main(argv[:2] + ["--length", "4096", "--top", "1", "--sources", "--files",
                              str(tiny.eval[0])]) == 2
    assert "no held-out document has --length 4096 tokens" in capsys.readouterr().err
    assert reach_cli.main(argv[:2] + ["--top", "3", "--sources", "--files", str(tiny.eval[0])]) == 2
    assert "--top 3 exceeds the model's 2 layers" in capsys.readouterr().err
