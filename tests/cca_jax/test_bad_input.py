"""Bad input to the model, its config and the attention layer: a clear error naming the
argument before any compute, and the documented behaviour where nothing can be checked."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cca_jax import CCAAttention, LlamaConfig, LlamaForCausalLM, cca_attention
from cca_jax.llama import check_token_ids


@pytest.fixture(scope="module")
def model():
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, attention="cca", group_size=4,
                                        window_size=8), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("bad", [64, 1000, -1])
@pytest.mark.parametrize("as_jax", [False, True], ids=["numpy", "jax"])
def test_token_ids_outside_the_vocabulary_are_refused(model, bad, as_jax):
    ids = np.arange(24, dtype=np.int32).reshape(2, 12)
    ids[1, 7] = bad
    ids = jnp.asarray(ids) if as_jax else ids
    with pytest.raises(ValueError, match=rf"input_ids holds token id {bad} \(at index \(1, 7\)\)"
                                         r".*\[0, 64\) \(vocab_size=64\)"):
        model(ids)


def test_token_ids_under_jit_behave_as_documented(model):
    """Traced ids cannot be checked: an id >= vocab_size makes its own and every later
    position of its row NaN (earlier positions and other rows untouched); -1 is the last
    token of the vocabulary (cca_jax.llama's module docstring)."""
    forward = nnx.jit(lambda model, ids: model(ids))
    ids = np.arange(24, dtype=np.int32).reshape(2, 12) % 64
    clean = np.asarray(forward(model, jnp.asarray(ids)))
    too_large = ids.copy()
    too_large[0, 5] = 64
    got = np.asarray(forward(model, jnp.asarray(too_large)))
    np.testing.assert_array_equal(got[0, :5], clean[0, :5])
    np.testing.assert_array_equal(got[1], clean[1])
    assert np.isnan(got[0, 5:]).all()
    minus_one, last = ids.copy(), ids.copy()
    minus_one[0, 5], last[0, 5] = -1, 63
    np.testing.assert_array_equal(np.asarray(forward(model, jnp.asarray(minus_one))),
                                  np.asarray(forward(model, jnp.asarray(last))))


def test_check_token_ids_accepts_the_whole_vocabulary():
    check_token_ids(np.array([[0, 63]]), 64)
    check_token_ids(np.zeros((1, 0), np.int32), 64)
    with pytest.raises(ValueError, match="the prompt holds token id 64"):
        check_token_ids(np.array([[0, 64]]), 64, "the prompt")


@pytest.mark.parametrize("field,value,match", [
    ("rms_norm_eps", -1e-6, "rms_norm_eps must be a finite number >= 0"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps"),
    ("rms_norm_eps", "1e-6", "rms_norm_eps"),
    ("rope_theta", 0.0, "rope_theta must be a finite number > 0"),
    ("rope_theta", float("inf"), "rope_theta"),
    ("head_dim", 0, "head_dim must be >= 1"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false"),
    ("attention_bias", 1, "attention_bias must be true or false"),
    ("bos_token_id", -1, "bos_token_id must be None, an int >= 0"),
    ("eos_token_id", (2, -5), "eos_token_id must be None, an int >= 0"),
    ("eos_token_id", 2.5, "eos_token_id"),
])
def test_invalid_config_values_are_refused_when_the_config_is_built(field, value, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LlamaConfig(**{field: value})
    with pytest.raises((ValueError, TypeError), match=match):
        LlamaConfig.from_dict({field: value})


def test_valid_config_edge_values_are_accepted():
    LlamaConfig(rms_norm_eps=0.0, rope_theta=1, eos_token_id=[1, 2], bos_token_id=None,
                head_dim=8)


def test_attention_layer_names_a_wrong_input_shape():
    layer = CCAAttention(32, num_heads=4, rngs=nnx.Rngs(0))
    for x in (jnp.zeros((6, 32)), jnp.zeros((1, 6, 16)), jnp.zeros((1, 2, 6, 32))):
        with pytest.raises(ValueError, match=r"x must have shape \[batch, length, "
                                             r"hidden_size=32\], got shape"):
            layer(x)
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        layer(jnp.zeros((1, 6, 32), jnp.int32))
    assert layer(jnp.zeros((1, 6, 32))).shape == (1, 6, 32)


@pytest.mark.parametrize("implementation,options", [("reference", {}), ("xla", {}),
                                                    ("pallas", {"interpret": True})])
def test_empty_batch_is_named_in_every_implementation(implementation, options):
    q, k = jnp.zeros((0, 8, 2, 4)), jnp.zeros((0, 8, 1, 4))
    with pytest.raises(ValueError, match=r"batch, length and head counts must be >= 1.*"
                                         r"got q \(0, 8, 2, 4\)"):
        cca_attention(q, k, k, group_size=2, window_size=4, implementation=implementation,
                      **options)


def test_empty_batch_is_named_by_the_kernel_entry_point():
    from cca_kernels.cca_attention import cca_attention_pallas
    q, k = jnp.zeros((0, 8, 2, 4)), jnp.zeros((0, 8, 1, 4))
    with pytest.raises(ValueError, match=r"batch, length, heads and head_dim must all be >= 1"):
        cca_attention_pallas(q, k, k, jnp.zeros((0, 2, 2, 4)), jnp.zeros((0, 2, 2, 4)),
                             group_size=2, window_size=4, scale=0.5, interpret=True)
