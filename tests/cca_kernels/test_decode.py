"""The split-K Pallas decode kernel (interpret mode on the CPU) against the dense jnp decode
attention, and cached generation through the kernel against the jnp path.

Small blocks and chunks so that every case has several core and raw splits, a clamped
(ragged) last block, splits with nothing visible, and core counts of 0 and of the capacity.
The GPU class at the end runs the same checks with Triton, bf16 and long caches.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cca_kernels import decode
from cca_kernels.decode import MASK_VALUE, _plan, decode_attention_pallas, merge_partials

# The oracle jitted: one compiled program instead of one per primitive (op by op).
decode_attention_reference = jax.jit(decode.decode_attention_reference, static_argnames="scale")


def _inputs(seed, B, H, Hkv, d, C, R, dtype=jnp.float32, valid_p=0.6):
    keys = jax.random.split(jax.random.PRNGKey(seed), 7)
    q = jax.random.normal(keys[0], (B, H, d), dtype)
    core_k = jax.random.normal(keys[1], (B, C, H, d), dtype)
    core_v = jax.random.normal(keys[2], (B, C, H, d), dtype)
    raw_k = jax.random.normal(keys[3], (B, R, Hkv, d), dtype)
    raw_v = jax.random.normal(keys[4], (B, R, Hkv, d), dtype)
    valid = jax.random.bernoulli(keys[5], valid_p, (B, R)).at[:, R // 2].set(True)
    count = jax.random.randint(keys[6], (B,), 0, C + 1).at[0].set(C)
    if B > 1:
        count = count.at[1].set(0)
    return q, core_k, core_v, count, raw_k, raw_v, valid


# (B, H, Hkv, d, C, R, block_k, chunk): GQA 1/2/4, C and R not multiples of the block, C
# smaller than a block (the block shrinks), several splits each.
CASES = [
    (2, 4, 2, 16, 37, 21, 8, 8),
    (3, 4, 1, 32, 100, 20, 16, 16),
    (1, 2, 2, 16, 5, 40, 8, 16),
    (2, 2, 1, 64, 1, 3, 4, 4),
]


@pytest.mark.parametrize("B,H,Hkv,d,C,R,block_k,chunk", CASES)
def test_pallas_interpret_matches_reference(B, H, Hkv, d, C, R, block_k, chunk):
    q, ck, cv, count, rk, rv, valid = _inputs(B * 100 + C + R, B, H, Hkv, d, C, R)
    ref = decode_attention_reference(q, rk, rv, valid, ck, cv, count)
    got = decode_attention_pallas(q, rk, rv, valid, ck, cv, count, interpret=True,
                                  block_k=block_k, chunk=chunk)
    assert got.shape == (B, H, d) and got.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-6, rtol=1e-5)
    # Without core tokens it is plain masked decode attention (the full-cache case).
    ref = decode_attention_reference(q, rk, rv, valid)
    got = decode_attention_pallas(q, rk, rv, valid, interpret=True, block_k=block_k,
                                  chunk=chunk)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-6, rtol=1e-5)


def test_reference_is_one_softmax_over_core_and_raw():
    """decode_attention_reference written out by hand for one row and head."""
    q, ck, cv, count, rk, rv, valid = _inputs(5, 1, 2, 1, 8, 6, 7)
    count = jnp.array([4])
    out = np.asarray(decode_attention_reference(q, rk, rv, valid, ck, cv, count))
    for h in range(2):
        keys = np.concatenate([np.asarray(ck[0, :4, h]), np.asarray(rk[0, :, 0])[
            np.asarray(valid[0])]])
        values = np.concatenate([np.asarray(cv[0, :4, h]), np.asarray(rv[0, :, 0])[
            np.asarray(valid[0])]])
        scores = keys @ np.asarray(q[0, h]) / np.sqrt(8)
        p = np.exp(scores - scores.max())
        np.testing.assert_allclose(out[0, h], p @ values / p.sum(), rtol=1e-5, atol=1e-6)


def test_bfloat16_interpret_close_to_float32_reference():
    q, ck, cv, count, rk, rv, valid = _inputs(9, 2, 4, 2, 32, 50, 30)
    ref = decode_attention_reference(q, rk, rv, valid, ck, cv, count)
    bf = [x.astype(jnp.bfloat16) for x in (q, ck, cv, rk, rv)]
    got = decode_attention_pallas(bf[0], bf[3], bf[4], valid, bf[1], bf[2], count,
                                  interpret=True, block_k=16, chunk=16)
    assert got.dtype == jnp.bfloat16
    err = np.linalg.norm(np.asarray(got, np.float32) - np.asarray(ref)) / np.linalg.norm(
        np.asarray(ref))
    assert err < 1e-2, err


def test_merge_of_partials_ignores_empty_splits():
    acc = jnp.array([[[[2.0, 4.0], [0.0, 0.0], [3.0, 3.0]]]])        # [1, 1, 3, 2]
    stats = jnp.array([[[[0.0, 2.0], [MASK_VALUE, 0.0], [np.log(2.0), 1.0]]]])
    out = np.asarray(merge_partials(acc, stats))[0, 0]
    # Split 2 has weight exp(log 2) = 2 relative to split 0: (2,4) + 2*(3,3) over 2 + 2*1.
    np.testing.assert_allclose(out, [(2 + 6) / 4, (4 + 6) / 4], rtol=1e-6)


def test_split_plan_covers_every_slot_once():
    for length in range(1, 200, 7):
        for block, chunk, max_splits in ((64, 512, 32), (8, 16, 4), (16, 8, 32)):
            b, n_splits, per_split = _plan(length, block, chunk, max_splits)
            assert b & (b - 1) == 0 and b <= length and n_splits <= max_splits
            n_blocks = -(-length // b)
            assert (n_splits - 1) * per_split < n_blocks <= n_splits * per_split


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=jnp.zeros((1, 2, 24))), "power-of-2 head_dim"),
    (dict(block_k=12), "block_k must be a power of 2"),
    (dict(chunk=0), "chunk must be an int >= 1"),
    (dict(raw_valid=jnp.ones((1, 5), bool)), "raw_valid must be"),
    (dict(core_count=None), "given together"),
])
def test_bad_arguments(kwargs, match):
    args = dict(q=jnp.zeros((1, 2, 16)), raw_k=jnp.zeros((1, 4, 1, 16)),
                raw_v=jnp.zeros((1, 4, 1, 16)), raw_valid=jnp.ones((1, 4), bool),
                core_k=jnp.zeros((1, 3, 2, 16)), core_v=jnp.zeros((1, 3, 2, 16)),
                core_count=jnp.array([1]), interpret=True)
    if "q" in kwargs:
        d = kwargs["q"].shape[-1]
        args.update(raw_k=jnp.zeros((1, 4, 1, d)), raw_v=jnp.zeros((1, 4, 1, d)),
                    core_k=jnp.zeros((1, 3, 2, d)), core_v=jnp.zeros((1, 3, 2, d)))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        decode_attention_pallas(**args)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU refusal")
def test_refuses_the_cpu_without_interpret():
    q, ck, cv, count, rk, rv, valid = _inputs(1, 1, 2, 1, 16, 4, 4)
    with pytest.raises(ValueError, match="needs a GPU backend"):
        decode_attention_pallas(q, rk, rv, valid, ck, cv, count)


def test_generation_through_the_kernel_equals_the_jnp_path():
    """The whole cached generation with the Pallas kernel (interpret mode) in every decode
    step gives the jnp path's tokens and logits; the decode crosses the window edge and
    several group boundaries."""
    from cca_jax import LlamaConfig, LlamaForCausalLM
    from cca_jax.generate import generate

    config = LlamaConfig(num_key_value_heads=2, attention="cca", group_size=2, window_size=4,
                         num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                         intermediate_size=64)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    ids = np.array([[0, 0, 5, 9, 17], [3, 1, 4, 1, 5]], np.int32)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    jnp_out, jnp_logits = generate(model, ids, 8, attention_mask=mask, return_logits=True,
                                   decode_implementation="jnp")
    pl_out, pl_logits = generate(model, ids, 8, attention_mask=mask, return_logits=True,
                                 decode_implementation="pallas", interpret=True)
    np.testing.assert_array_equal(pl_out, jnp_out)
    np.testing.assert_allclose(pl_logits, jnp_logits, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
class TestDecodeKernelOnGPU:
    """Run on the device: `python -m pytest -q tests/kernels/test_decode.py -m gpu`."""

    @pytest.mark.parametrize("C,R,H,Hkv,d", [(8128, 1040, 32, 32, 128), (4032, 1040, 32, 8, 64),
                                             (3, 17, 8, 2, 64)])
    def test_bfloat16_against_float32_reference(self, C, R, H, Hkv, d):
        q, ck, cv, count, rk, rv, valid = _inputs(C, 2, H, Hkv, d, C, R)
        ref = decode_attention_reference(q, rk, rv, valid, ck, cv, count)
        bf = [x.astype(jnp.bfloat16) for x in (q, ck, cv, rk, rv)]
        got = decode_attention_pallas(bf[0], bf[3], bf[4], valid, bf[1], bf[2], count)
        assert bool(jnp.isfinite(got.astype(jnp.float32)).all())
        err = jnp.linalg.norm(got.astype(jnp.float32) - ref) / jnp.linalg.norm(ref)
        assert float(err) < 1e-2

    def test_float32_exact(self):
        q, ck, cv, count, rk, rv, valid = _inputs(3, 2, 8, 2, 64, 300, 70)
        ref = decode_attention_reference(q, rk, rv, valid, ck, cv, count)
        got = decode_attention_pallas(q, rk, rv, valid, ck, cv, count)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=1e-4)
