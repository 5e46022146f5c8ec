"""Hybrid models: `LlamaConfig.full_attention_layers` (full attention in the listed layers, CCA
in the rest) through the training forward, prefill, decode, the cache and its size, the
config's validation, the converted directory and the generate command line.

Exactness (float32, random weights and inputs): every layer listed == attention="full" and no
layer listed == plain CCA, bit for bit where the computation is the same; a mixed pattern
equals a reference that runs the layers one by one, each from a model of the right kind (the
same weights), in logits and gradients; cached generation of a hybrid (one-shot and chunked
prefill, ragged prompts with left or right padding, prompts shorter than w, w % g != 0, GQA)
gives the greedy tokens of the uncached oracle and its full-sequence logits within 1e-4.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cca_jax import LlamaConfig, LlamaForCausalLM, from_pretrained
from cca_jax.cache import (CacheSpec, CacheStep, CCALayerCache, FullLayerCache, attend_cached,
                           cache_bytes_by_kind, cache_bytes_for, init_cache, prefill)
from cca_jax.config import layer_attention, parse_layer_indices
from cca_jax.generate import generate, greedy_generate_uncached

G, W = 4, 10            # w % g != 0
TOLERANCE = 1e-4        # cached vs full-sequence logits, as in test_generate.py


def _config(**changes) -> LlamaConfig:
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                       attention="cca", group_size=G, window_size=W).replace(**changes)


def _model(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    return LlamaForCausalLM(config, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def weights():
    """The parameters every model of this file shares (a random model's)."""
    return nnx.state(_model(_config()), nnx.Param)


def _with_weights(config, weights) -> LlamaForCausalLM:
    model = _model(config, seed=1)
    nnx.update(model, weights)
    return model


def _forward(model, ids):
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, ids))


def _reference(config, weights):
    """(loss(state, ids, cotangent), logits(state, ids)) of the hand-built hybrid: one
    parameter state merged into an all-CCA and an all-full model; layer i runs from the
    model of its kind."""
    kinds = [("full" if i in config.full_attention_layers else "cca")
             for i in range(config.num_hidden_layers)]
    graphs = {kind: nnx.split(_with_weights(config.replace(attention=kind,
                                                           full_attention_layers=()),
                                            weights))[0] for kind in ("cca", "full")}

    def logits(state, ids):
        models = {kind: nnx.merge(graph, state) for kind, graph in graphs.items()}
        x = models["cca"].embed_tokens(ids)
        for index, kind in enumerate(kinds):
            x = models[kind].layers[index](x)
        return models["cca"].logits(models["cca"].norm(x))

    return (lambda state, ids, cot: jnp.sum(logits(state, ids) * cot)), logits


def test_training_forward_all_full_none_and_mixed(weights):
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 37)), jnp.int32)
    plain_cca = _forward(_with_weights(_config(), weights), ids)
    full = _forward(_with_weights(_config(attention="full"), weights), ids)
    # Every layer listed is the full-attention model; none listed is plain CCA.
    every = _config(full_attention_layers=(0, 1, 2))
    np.testing.assert_array_equal(_forward(_with_weights(every, weights), ids), full)
    assert _config(full_attention_layers=()) == _config()
    assert _config(attention="full", full_attention_layers=(1,)).attention_kinds == (
        "full",) * 3
    np.testing.assert_array_equal(_forward(_with_weights(_config(), weights), ids), plain_cca)
    # A mixed pattern equals the layer-by-layer reference, and differs from both ends.
    mixed = _config(full_attention_layers=(2, 0))
    assert mixed.full_attention_layers == (0, 2)
    assert mixed.attention_kinds == ("full", "cca", "full")
    model = _with_weights(mixed, weights)
    assert [layer.self_attn.attention for layer in model.layers] == ["full", "cca", "full"]
    ours = _forward(model, ids)
    loss, logits = _reference(mixed, weights)
    state = nnx.state(model, nnx.Param)
    np.testing.assert_allclose(ours, np.asarray(jax.jit(logits)(state, ids)), atol=1e-6,
                               rtol=0)
    assert np.abs(ours - plain_cca).max() > 1e-3 and np.abs(ours - full).max() > 1e-3
    # Training: the gradients of every parameter agree too (remat on, as train.finetune may).
    cot = jnp.asarray(np.random.default_rng(4).standard_normal(ours.shape), jnp.float32)
    graphdef, _ = nnx.split(_with_weights(mixed.replace(remat="full"), weights))

    def our_loss(state, ids, cot):
        return jnp.sum(nnx.merge(graphdef, state)(ids) * cot)

    ours_grad = jax.jit(jax.grad(our_loss))(state, ids, cot)
    reference_grad = jax.jit(jax.grad(loss))(state, ids, cot)
    # Within float32 rounding of each leaf's scale: entries reach ~60 here, and the two
    # programs sum in different orders (measured: 1.4e-6 of the largest entry with XLA's
    # default CPU settings, 5e-7 with the suite's, bit-identical with some others).
    for a, b in zip(jax.tree_util.tree_leaves(ours_grad),
                    jax.tree_util.tree_leaves(reference_grad)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def _batch(prompts, side):
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), 7, np.int32)
    mask = np.zeros_like(ids)
    for b, p in enumerate(prompts):
        cols = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[b, cols], mask[b, cols] = p, 1
    return ids, mask


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(5)
    return [rng.integers(1, 256, n).astype(np.int32) for n in (5, 29, 13)]   # < w, > w + g


@pytest.fixture(scope="module")
def hybrid(weights, prompts):
    """A hybrid model, and its uncached oracle on the prompts: greedy sequences and their
    full-sequence logits."""
    model = _with_weights(_config(full_attention_layers=(1,)), weights)
    new = 16
    ids, _ = _batch(prompts, "right")
    lengths = [len(p) for p in prompts]
    out = greedy_generate_uncached(model, ids, new, prompt_lengths=lengths)
    sequences = [row[:n + new] for row, n in zip(out, lengths)]
    width = max(len(s) for s in sequences)
    batch = np.zeros((len(sequences), width), np.int32)
    for b, s in enumerate(sequences):
        batch[b, :len(s)] = s
    return model, new, sequences, _forward(model, jnp.asarray(batch))


@pytest.mark.parametrize("side,prefill_chunk", [("left", None), ("right", 8)])
def test_cached_generation_of_a_hybrid_is_exact(hybrid, prompts, side, prefill_chunk):
    """One-shot prefill + decode (left padding), and prefill in chunks of 8 (`append_layer`
    in every layer, each of its kind; right padding), against the uncached oracle."""
    model, new, sequences, full_logits = hybrid
    ids, mask = _batch(prompts, side)
    out, logits = generate(model, ids, new, attention_mask=mask, return_logits=True,
                           prefill_chunk=prefill_chunk, decode_chunk=5)
    worst = 0.0
    for b, prompt in enumerate(prompts):
        L = len(prompt)
        row = out[b, ids.shape[1] - L:] if side == "left" else out[b, :L + new]
        np.testing.assert_array_equal(row, sequences[b], err_msg=f"row {b}")
        worst = max(worst, float(np.abs(logits[b] - full_logits[b, L - 1:L - 1 + new]).max()))
    print(f"hybrid, {side} padding, prefill chunk {prefill_chunk}: max |logit difference| "
          f"{worst:.2e}")
    assert worst < TOLERANCE, worst


def test_cached_generation_all_full_is_the_full_cache(weights, prompts):
    every = _with_weights(_config(full_attention_layers=(0, 1, 2)), weights)
    full = _with_weights(_config(attention="full"), weights)
    ids, mask = _batch(prompts, "left")
    ours = generate(every, ids, 12, attention_mask=mask, return_logits=True)
    theirs = generate(full, ids, 12, attention_mask=mask, return_logits=True)
    np.testing.assert_array_equal(ours[0], theirs[0])
    np.testing.assert_allclose(ours[1], theirs[1], atol=1e-6, rtol=0)
    spec = CacheSpec.for_model(every.config, 1, 40)
    assert all(isinstance(layer, FullLayerCache) for layer in init_cache(spec).layers)
    assert cache_bytes_for(spec) == cache_bytes_for(CacheSpec.for_model(full.config, 1, 40))
    # attention="full" (as generate(attention="full") asks) makes every layer full.
    assert CacheSpec.for_model(_config(full_attention_layers=(1,)), 1, 40,
                               "full").full_attention_layers == ()


def test_cache_holds_each_layer_of_its_kind_and_counts_its_bytes():
    B, M, H, Hkv, d = 2, 100, 4, 2, 16
    spec = CacheSpec.for_model(_config(full_attention_layers=[1]), B, M)
    C, R = spec.core_capacity, spec.raw_capacity
    assert (C, R) == ((M - W) // G, W + G)
    cache = init_cache(spec)
    assert [type(layer) for layer in cache.layers] == [CCALayerCache, FullLayerCache,
                                                       CCALayerCache]
    assert cache.layers[1].k.shape == cache.layers[1].v.shape == (B, M, Hkv, d)
    assert cache.layers[0].core_k.shape == (B, C, H, d)
    assert cache.layers[2].raw_v.shape == (B, R, Hkv, d)
    full_layer = 2 * B * M * Hkv * d * 4
    cca_layer = 2 * B * C * H * d * 4 + 2 * B * R * Hkv * d * 4
    assert cache_bytes_for(spec) == 2 * cca_layer + full_layer + B * 4   # + lengths [B]
    assert cache_bytes_by_kind(spec) == {"cca": (2, 2 * cca_layer), "full": (1, full_layer)}
    plain = CacheSpec.for_model(_config(), B, M)
    assert cache_bytes_by_kind(plain) == {"cca": (3, 3 * cca_layer)}
    assert [spec.layer_attention(i) for i in range(3)] == ["cca", "full", "cca"]
    assert spec.layer_spec(1).attention == "full" and spec.layer_spec(0).attention == "cca"
    assert spec.layer_spec(1).full_attention_layers == ()


def test_a_cache_of_another_pattern_is_refused(weights):
    model = _with_weights(_config(full_attention_layers=(1,)), weights)
    ids = jnp.ones((1, 6), jnp.int32)
    plain = CacheSpec.for_model(_config(), 1, 20)
    with pytest.raises(ValueError, match="does not fit the model"):
        prefill(model, plain, ids, jnp.asarray([6]))
    # One layer's attention with the other kind's layer cache.
    spec = CacheSpec.for_model(model.config, 1, 20)
    step = CacheStep(start=jnp.zeros((1,), jnp.int32), count=jnp.ones((1,), jnp.int32),
                     spec=spec)
    q = jnp.zeros((1, 1, 4, 16))
    k = jnp.zeros((1, 1, 2, 16))
    cache = init_cache(spec)
    with pytest.raises(TypeError, match="needs a FullLayerCache; got a CCALayerCache"):
        attend_cached(step.for_layer(1), cache.layers[0], q, k, k)
    with pytest.raises(ValueError, match="one layer's step"):
        attend_cached(step, cache.layers[0], q, k, k)


@pytest.mark.parametrize("value,error,match", [
    ((3,), ValueError, r"full_attention_layers: layer 3 is out of range \(the model has 3 "
                       r"layers, 0 .. 2\)"),
    ((-1,), ValueError, "full_attention_layers: layer -1 is out of range"),
    ((1, 0, 1), ValueError, "full_attention_layers lists layer 1 more than once"),
    ((1.0,), TypeError, "full_attention_layers must be a list of layer indices"),
    ((True,), TypeError, "full_attention_layers must be a list of layer indices"),
    ("1,2", TypeError, "full_attention_layers must be a list of layer indices"),
    (1, TypeError, "full_attention_layers must be a list of layer indices"),
])
def test_config_rejects_bad_layer_lists(value, error, match):
    with pytest.raises(error, match=match):
        _config(full_attention_layers=value)
    with pytest.raises(error, match=match):
        CacheSpec(attention="cca", batch_size=1, max_length=8, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=16, full_attention_layers=value)


def test_config_normalises_the_list_and_stays_hashable():
    config = _config(full_attention_layers=[np.int64(2), 0])
    assert config.full_attention_layers == (0, 2) and isinstance(
        config.full_attention_layers[0], int)
    assert config == _config(full_attention_layers=(0, 2))
    assert hash(config) == hash(_config(full_attention_layers=(0, 2)))
    assert [layer_attention(config, i) for i in range(3)] == ["full", "cca", "full"]
    # Kept under attention="full" (every layer full), so switching back gives the hybrid.
    full = config.replace(attention="full")
    assert full.full_attention_layers == (0, 2) and full.attention_kinds == ("full",) * 3
    assert full.replace(attention="cca") == config
    # A shorter model cannot keep a list that reaches past it.
    with pytest.raises(ValueError, match="layer 2 is out of range"):
        config.replace(num_hidden_layers=2)


@pytest.mark.parametrize("text,expected", [
    ("3,11", (3, 11)), (" 11, 3 ", (3, 11)), ("0", (0,)), ("none", ()), ("", ()),
])
def test_parse_layer_indices(text, expected):
    assert parse_layer_indices(text) == expected


@pytest.mark.parametrize("text,match", [
    ("3;11", "expected layer indices"), ("a", "expected layer indices"),
    ("-1", "expected layer indices"), ("3,,4", "expected layer indices"),
    ("3,3", "layer 3 is listed more than once"),
])
def test_parse_layer_indices_rejects(text, match):
    with pytest.raises(ValueError, match=f"^--full-attention-layers: {match}"):
        parse_layer_indices(text)


def test_saved_and_loaded_with_the_converted_model(weights, tmp_path):
    from cca_jax.converted import CONFIG_FILE, read_converted_config, save_converted

    config = _config(full_attention_layers=(1,))
    model = _with_weights(config, weights)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    path = save_converted(tmp_path / "hybrid", params, config)
    data = json.loads((path / CONFIG_FILE).read_text())
    assert data["full_attention_layers"] == [1]
    assert read_converted_config(path) == config
    assert LlamaConfig.from_dict(data) == config
    # from_pretrained keeps the directory's layers unless told otherwise.
    loaded = from_pretrained(path, attention="cca", group_size=G, window_size=W)
    assert loaded.config.full_attention_layers == (1,)
    assert [layer.self_attn.attention for layer in loaded.layers] == ["cca", "full", "cca"]
    ids = jnp.asarray(np.random.default_rng(6).integers(0, 256, (1, 30)), jnp.int32)
    np.testing.assert_array_equal(_forward(loaded, ids), _forward(model, ids))
    assert from_pretrained(path, attention="cca", full_attention_layers=[]).config \
        .full_attention_layers == ()
    assert from_pretrained(path, attention="cca", full_attention_layers=[0, 2]).config \
        .attention_kinds == ("full", "cca", "full")
    with pytest.raises(ValueError, match="full_attention_layers: layer 5 is out of range"):
        from_pretrained(path, attention="cca", full_attention_layers=[5])
    # A directory written before the field existed loads as plain CCA.
    del data["full_attention_layers"]
    (path / CONFIG_FILE).write_text(json.dumps(data))
    assert read_converted_config(path) == config.replace(full_attention_layers=())


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory):
    """A converted 2-layer hybrid (layer 1 full) with a word-level tokenizer."""
    from cca_jax.converted import save_converted
    from tests.train.tiny import VOCAB_SIZE, write_tokenizer

    root = tmp_path_factory.mktemp("hybrid")
    eos = write_tokenizer(root / "tokenizer")
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         eos_token_id=eos, attention="cca", group_size=4, window_size=8,
                         full_attention_layers=(1,))
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    return save_converted(root / "model", nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                          config, tokenizer_src=root / "tokenizer")


PROMPT = "the king rides into the castle and the queen sleeps " * 3


def test_generate_cli_flag_and_cache_report(hybrid_dir, capsys):
    from cca_jax.generate.cli import main
    from cca_jax.loading import load_tokenizer

    common = ["--model", str(hybrid_dir), "--prompt", PROMPT, "--max-new-tokens", "6",
              "--group-size", "4", "--window-size", "8", "--ignore-eos"]
    assert main(common) == 0                       # the directory's layers: layer 1 full
    captured = capsys.readouterr()
    assert "full attention in layers 1)" in captured.err
    assert "(1 CCA layer " in captured.err and ", 1 full-attention layer " in captured.err
    tokenizer = load_tokenizer(hybrid_dir)
    ids = np.asarray(tokenizer(PROMPT)["input_ids"], np.int32)[None]
    model = from_pretrained(hybrid_dir, attention="cca", group_size=4, window_size=8)
    expected = generate(model, ids, 6)[0, ids.shape[1]:]
    assert captured.out == tokenizer.decode(expected, skip_special_tokens=True) + "\n"

    assert main(common + ["--full-attention-layers", "none"]) == 0
    err = capsys.readouterr().err
    assert "full attention in layers" not in err and "full-attention layer" not in err
    assert main(common + ["--full-attention-layers", "2"]) == 2
    err = capsys.readouterr().err
    assert "error: --full-attention-layers: layer 2 is out of range (the model has 2 " \
           "layers, 0 .. 1)" in err
    with pytest.raises(SystemExit) as exit_info:
        main(common + ["--full-attention-layers", "1;2"])
    assert exit_info.value.code == 2
    assert "argument --full-attention-layers: expected layer indices" in capsys.readouterr().err
