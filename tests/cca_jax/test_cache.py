"""The decode cache at the attention level, its byte count and its input handling.

The strongest check lives here: random q, k, v; a prefill of each sequence's prompt, then
one decode step per token; every decoded output must equal the full-sequence reference
(`cca_reference`, the oracle of docs/cca.md) at that position. The cases cover g = 1, w = 1, w not a
multiple of g, w < g, prompts shorter than w and longer than w + g, caches too short to hold
any core token, and sequences of different lengths in one batch.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cca_jax import reference as oracle
from cca_jax.cache import (CacheSpec, append_layer, cache_bytes_for, cache_nbytes, decode_layer,
                           init_cache, normalize_padding, prefill_layer)
from cca_kernels.visibility import visible_core_count
from tests.conftest import random_qkv

# The oracles jitted: one compiled program each instead of one per primitive (op by op).
cca_reference = jax.jit(oracle.cca_reference, static_argnames=("group_size", "window_size",
                                                                "scale"))
causal_reference = jax.jit(oracle.causal_reference, static_argnames="scale")
pool_core_tokens = jax.jit(oracle.pool_core_tokens, static_argnames=("group_size", "scale",
                                                                     "num_groups"))


def _spec(attention, B, max_length, H, Hkv, d, g, w):
    return CacheSpec(attention=attention, batch_size=B, max_length=max_length, num_layers=1,
                     num_heads=H, num_kv_heads=Hkv, head_dim=d, group_size=g, window_size=w)


def _run_cache(spec, q, k, v, prompt_lengths, steps):
    """Prefill each row's prompt, then `steps` decode steps (all rows step together, each at
    its own position). Returns the decoded outputs {(b, t): out[b]} and the final cache."""
    prompt_lengths = np.asarray(prompt_lengths)
    width = int(prompt_lengths.max())
    assert width + steps <= min(spec.max_length, q.shape[1])
    prefill = jax.jit(prefill_layer, static_argnums=0)
    cache = prefill(spec, q[:, :width], k[:, :width], v[:, :width],
                    jnp.asarray(prompt_lengths, jnp.int32))
    outputs = {}
    cache = _decode_steps(spec, cache, q, k, v, prompt_lengths, steps, outputs)
    return outputs, cache


def _decode_steps(spec, cache, q, k, v, positions, steps, outputs):
    """`steps` decode steps from `positions` [B] on (every row one token per step); each
    output goes into outputs[(b, t)]. Returns the cache."""
    step = jax.jit(decode_layer, static_argnums=0)
    for i in range(steps):
        now = np.asarray(positions) + i
        take = jnp.asarray(now)[:, None, None, None]
        pick = lambda x: jnp.take_along_axis(x, take, axis=1)[:, 0]
        out, cache = step(spec, cache, pick(q), pick(k), pick(v), jnp.asarray(now, jnp.int32))
        for b, t in enumerate(now):
            outputs[(b, int(t))] = np.asarray(out[b])
    return cache


# (B, H, Hkv, d, g, w, prompt lengths, decode steps, max_length); the longest row's last
# decoded position is max_length - 1 (the cache is full after the last step).
CASES = [
    (2, 4, 2, 16, 4, 16, [5, 29], 21, 50),      # short and long prompt, GQA 2
    (1, 2, 2, 8, 4, 10, [3], 42, 45),           # w % g != 0
    (2, 2, 1, 8, 1, 1, [1, 4], 16, 20),         # g = 1, w = 1
    (1, 4, 4, 8, 8, 3, [2], 38, 40),            # w < g
    (2, 4, 1, 8, 4, 8, [30, 12], 8, 38),        # GQA 4, prompt > w + g
    (1, 2, 1, 8, 4, 16, [6], 8, 14),            # cache too short for any core token
    (3, 2, 2, 8, 3, 7, [1, 9, 20], 11, 31),     # three rows, ragged everything
]


@pytest.mark.parametrize("B,H,Hkv,d,g,w,prompts,steps,max_length", CASES)
def test_cca_cache_decode_equals_full_sequence_reference(B, H, Hkv, d, g, w, prompts, steps,
                                                          max_length):
    T = max_length
    totals = [p + steps for p in prompts]
    q, k, v, _ = random_qkv(T * 13 + g, B, T, H, Hkv, d)
    spec = _spec("cca", B, max_length, H, Hkv, d, g, w)
    reference = np.asarray(cca_reference(q, k, v, group_size=g, window_size=w,
                                         scale=1 / math.sqrt(d)))
    outputs, cache = _run_cache(spec, q, k, v, prompts, steps)
    assert len(outputs) == B * steps
    worst = max(np.abs(out - reference[b, t]).max() for (b, t), out in outputs.items())
    assert worst < 1e-5, worst
    # The core tokens held are the pooling (docs/cca.md §1) of the groups visible to the last query.
    core_k, core_v = pool_core_tokens(q, k, v, group_size=g, scale=1 / math.sqrt(d))
    for b, total in enumerate(totals):
        n = visible_core_count(total - 1, g, w)   # seen by the last decoded position
        if n:
            np.testing.assert_allclose(np.asarray(cache.core_k[b, :n]),
                                       np.asarray(core_k[b, :n]), atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(np.asarray(cache.core_v[b, :n]),
                                       np.asarray(core_v[b, :n]), atol=1e-5, rtol=1e-5)


def _run_chunks(spec, q, k, v, totals, schedule, *, first_empty, block_q, block_k,
                full_implementation="blocked"):
    """Feed each row's tokens 0 .. totals[b] - 1 through the cache in calls of the widths in
    `schedule` (all rows together, each at its own position; a row that has no tokens left
    gets count 0, a row with fewer than the width gets a ragged count). The first call is
    `prefill_layer` + the reference when first_empty, otherwise `append_layer` on an empty
    cache. Returns {(b, t): output at position t} for every t of every row, and the cache."""
    totals = np.asarray(totals)
    B = len(totals)
    append = jax.jit(append_layer, static_argnums=0,
                     static_argnames=("block_q", "block_k", "full_implementation"))
    prefill = jax.jit(prefill_layer, static_argnums=0)
    cache = init_cache(spec).layers[0]
    done = np.zeros(B, np.int64)
    outputs = {}
    for index, width in enumerate(schedule):
        count = np.clip(totals - done, 0, width)
        take = np.minimum(done[:, None] + np.arange(width)[None, :], q.shape[1] - 1)
        pick = lambda x: jnp.take_along_axis(x, jnp.asarray(take)[:, :, None, None], axis=1)
        if index == 0 and first_empty:
            cache = prefill(spec, pick(q), pick(k), pick(v), jnp.asarray(count, jnp.int32))
            out = None
        else:
            out, cache = append(spec, cache, pick(q), pick(k), pick(v),
                                jnp.asarray(done, jnp.int32), jnp.asarray(count, jnp.int32),
                                block_q=block_q, block_k=block_k,
                                full_implementation=full_implementation)
            out = np.asarray(out)
            for b in range(B):
                for i in range(count[b]):
                    outputs[(b, int(done[b] + i))] = out[b, i]
        done = done + count
    assert (done == totals).all(), "the schedule must cover every token"
    return outputs, cache


# (attention, B, H, Hkv, d, g, w, totals, max_length, schedule, blocks, first_empty): the
# chunk widths cross group boundaries and the window edge at every offset; widths 1 (with
# rows that have no token left), smaller than g, larger than the raw ring (w + g) and than
# the whole cache; blocks smaller than the chunk, so that the blocked loops and their
# clamped last blocks run. first_empty: the first chunk goes through `prefill_layer` (as in
# generation) instead of `append_layer` on an empty cache.
CHUNK_CASES = [
    ("cca", 2, 4, 2, 16, 4, 16, [50, 31], 50, [7, 1, 13, 29], (8, 16), True),   # GQA, ragged
    ("cca", 2, 4, 2, 16, 4, 16, [50, 31], 50, [7, 1, 13, 29], (8, 16), False),
    ("cca", 1, 2, 2, 8, 4, 10, [45], 45, [3, 3, 3, 36], (4, 8), True),          # w % g != 0
    ("cca", 2, 2, 1, 8, 1, 1, [20, 9], 20, [5, 1, 1, 13], (3, 5), False),        # g = w = 1
    ("cca", 1, 4, 4, 8, 8, 3, [40], 40, [9, 17, 14], (16, 32), True),           # w < g
    ("cca", 3, 2, 2, 8, 3, 7, [31, 1, 20], 31, [2, 25, 4], (5, 7), False),      # three rows
    ("cca", 1, 2, 1, 8, 4, 16, [14], 14, [5, 9], (4, 4), True),                  # no core token
    ("cca", 1, 4, 2, 8, 4, 8, [60], 60, [60], (16, 8), False),                   # one chunk
    ("full", 2, 4, 2, 8, 4, 16, [25, 12], 25, [4, 1, 11, 9], (8, 16), True),
    ("full", 1, 2, 1, 8, 4, 16, [30], 30, [30], (7, 9), False),
]


@pytest.mark.parametrize(
    "attention,B,H,Hkv,d,g,w,totals,max_length,schedule,blocks,first_empty", CHUNK_CASES)
def test_chunks_equal_the_full_sequence_reference(attention, B, H, Hkv, d, g, w, totals,
                                                  max_length, schedule, blocks, first_empty):
    """Appending chunks of any width: every position's output equals the full-sequence
    reference (the oracle of docs/cca.md), and the core tokens held are the pooling (docs/cca.md §1) of the groups
    visible to the last position."""
    T = max_length
    q, k, v, _ = random_qkv(T * 7 + g + len(schedule), B, T, H, Hkv, d)
    spec = _spec(attention, B, max_length, H, Hkv, d, g, w)
    scale = 1 / math.sqrt(d)
    reference = np.asarray(cca_reference(q, k, v, group_size=g, window_size=w, scale=scale)
                           if attention == "cca" else causal_reference(q, k, v, scale=scale))
    outputs, cache = _run_chunks(spec, q, k, v, totals, schedule, first_empty=first_empty,
                                 block_q=blocks[0], block_k=blocks[1])
    expected = sum(totals) - (sum(min(t, schedule[0]) for t in totals) if first_empty else 0)
    assert len(outputs) == expected
    worst = max(np.abs(out - reference[b, t]).max() for (b, t), out in outputs.items())
    assert worst < 1e-5, worst
    if attention == "cca":
        core_k, core_v = pool_core_tokens(q, k, v, group_size=g, scale=scale)
        for b, total in enumerate(totals):
            n = visible_core_count(total - 1, g, w)
            if n:
                np.testing.assert_allclose(np.asarray(cache.core_k[b, :n]),
                                           np.asarray(core_k[b, :n]), atol=1e-5, rtol=1e-5)
                np.testing.assert_allclose(np.asarray(cache.core_v[b, :n]),
                                           np.asarray(core_v[b, :n]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("totals,schedule,first_empty", [
    ([25, 12, 1], [4, 1, 11, 9], True),      # ragged rows, a width-1 chunk, rows with count 0
    ([25, 12, 1], [4, 1, 11, 9], False),     # the first chunk appended to an empty cache
    ([30, 30, 30], [30], False),             # one chunk: every row's prefix is empty
])
def test_full_chunks_merged_by_log_sum_exp_equal_the_reference(totals, schedule, first_empty):
    """The GPU route of full-attention chunks (a fused call over the cached prefix, one over
    the chunk, merged by log-sum-exp) run with XLA's attention in place of cuDNN's: every
    position equals causal attention, including rows whose prefix is empty (the merge must
    drop that call) and padding columns."""
    B, H, Hkv, d, T = 3, 4, 2, 8, 30
    q, k, v, _ = random_qkv(23, B, T, H, Hkv, d)
    spec = _spec("full", B, T, H, Hkv, d, 4, 16)
    reference = np.asarray(causal_reference(q, k, v, scale=1 / math.sqrt(d)))
    outputs, _ = _run_chunks(spec, q, k, v, totals, schedule, first_empty=first_empty,
                             block_q=8, block_k=8, full_implementation="xla")
    assert len(outputs) == sum(totals) - (sum(min(t, schedule[0]) for t in totals)
                                          if first_empty else 0)
    worst = max(np.abs(out - reference[b, t]).max() for (b, t), out in outputs.items())
    assert worst < 1e-5, worst


def test_a_chunk_then_decode_steps_continue_exactly():
    """append_layer leaves the cache that decode_layer continues: chunks, then single-token
    decode steps (the decode path), every output against the reference."""
    B, H, Hkv, d, g, w, T = 2, 4, 2, 8, 4, 10, 48
    q, k, v, _ = random_qkv(5, B, T, H, Hkv, d)
    spec = _spec("cca", B, T, H, Hkv, d, g, w)
    reference = np.asarray(cca_reference(q, k, v, group_size=g, window_size=w,
                                         scale=1 / math.sqrt(d)))
    outputs, cache = _run_chunks(spec, q, k, v, [30, 19], [11, 19], first_empty=True,
                                 block_q=8, block_k=8)
    _decode_steps(spec, cache, q, k, v, np.array([30, 19]), 17, outputs)
    worst = max(np.abs(out - reference[b, t]).max() for (b, t), out in outputs.items())
    assert worst < 1e-5, worst
    assert max(t for _, t in outputs) == 46


def test_the_cache_matters():
    """Sanity of the oracle comparison: CCA differs from causal attention in these cases, so
    a cache that silently attended to everything would fail the test above."""
    q, k, v, _ = random_qkv(3, 1, 40, 2, 2, 8)
    cca = cca_reference(q, k, v, group_size=4, window_size=10, scale=8 ** -0.5)
    causal = causal_reference(q, k, v, scale=8 ** -0.5)
    assert float(jnp.abs(cca - causal)[:, 20:].max()) > 1e-2


def test_full_cache_decode_equals_causal_reference():
    B, H, Hkv, d, T = 2, 4, 2, 8, 25
    q, k, v, _ = random_qkv(11, B, T, H, Hkv, d)
    spec = _spec("full", B, T, H, Hkv, d, 4, 16)
    reference = np.asarray(causal_reference(q, k, v, scale=1 / math.sqrt(d)))
    outputs, _ = _run_cache(spec, q, k, v, [3, 17], 8)
    worst = max(np.abs(out - reference[b, t]).max() for (b, t), out in outputs.items())
    assert worst < 1e-5, worst


def test_raw_ring_is_large_enough_and_core_slots_are_written_before_they_are_seen():
    """Brute force over (g, w) of the ring arithmetic behind R = w + g and pooling at closing.

    After token t is written, the raw ring holds positions t - R + 1 .. t; everything read at
    step t (the raw window c(t) * g .. t and, when t closes a group, that group) must lie in
    it. Every core slot a query sees, j < c(t), belongs to a group that closed (and was
    pooled into its slot) at a step before t.
    """
    for g in range(1, 9):
        for w in range(1, 25):
            R = _spec("cca", 1, 10 ** 6, 1, 1, 2, g, w).raw_capacity
            for t in range(0, 4 * (w + g) + 2 * g):
                c = visible_core_count(t, g, w)
                oldest_read = c * g
                if (t + 1) % g == 0:
                    oldest_read = min(oldest_read, t + 1 - g)
                assert oldest_read >= t - R + 1, (g, w, t)
                if c:
                    closed_at = c * g - 1             # step that closed group c - 1
                    assert closed_at < t, (g, w, t)


def test_memory_llama2_7b_at_128k_is_over_90_percent_below_a_full_cache():
    """Bytes read from the arrays (jax.eval_shape: nothing is allocated)."""
    L, layers, H, d = 128 * 1024, 32, 32, 128
    spec = CacheSpec(attention="cca", batch_size=1, max_length=L, num_layers=layers,
                     num_heads=H, num_kv_heads=H, head_dim=d, group_size=16, window_size=1024,
                     dtype="bfloat16")
    shapes = jax.eval_shape(lambda: init_cache(spec))
    cca = cache_nbytes(shapes)
    full = cache_nbytes(jax.eval_shape(lambda: init_cache(dataclasses.replace(
        spec, attention="full"))))
    assert full == L * H * d * 2 * 2 * layers + 4 == 64 * 2 ** 30 + 4
    assert 1 - cca / full >= 0.90, (cca, full)
    assert cca / 2 ** 30 < 4.6, cca / 2 ** 30     # docs/cca.md §5: about 4.5 GiB


@pytest.mark.parametrize("L,g,w,H,Hkv,d,dtype,B,layers", [
    (100, 4, 16, 4, 2, 8, "float32", 1, 2),
    (77, 3, 10, 6, 3, 16, "bfloat16", 2, 3),
    (40, 16, 8, 2, 1, 8, "float32", 1, 1),
])
def test_byte_count_matches_spec_section_5(L, g, w, H, Hkv, d, dtype, B, layers):
    """docs/cca.md §5: per layer and sequence (w + g) * Hkv * d * 2 raw values plus
    floor((L - w) / g) * H * d * 2 core values, and one int32 length per sequence. Every
    leaf is accounted for."""
    spec = CacheSpec(attention="cca", batch_size=B, max_length=L, num_layers=layers,
                     num_heads=H, num_kv_heads=Hkv, head_dim=d, group_size=g, window_size=w,
                     dtype=dtype)
    item = jnp.dtype(dtype).itemsize
    shapes = jax.eval_shape(lambda: init_cache(spec))
    layer = shapes.layers[0]
    raw = (w + g) * Hkv * d * 2 * item
    core = ((L - w) // g) * H * d * 2 * item
    assert cache_nbytes((layer.raw_k, layer.raw_v)) == B * raw
    assert cache_nbytes((layer.core_k, layer.core_v)) == B * core
    assert cache_nbytes(shapes) == layers * B * (raw + core) + 4 * B
    assert cache_bytes_for(spec) == cache_nbytes(shapes)
    # The real arrays have the same bytes.
    assert sum(x.nbytes for x in jax.tree_util.tree_leaves(init_cache(spec))) == cache_nbytes(
        shapes)
    full = cache_bytes_for(dataclasses.replace(spec, attention="full"))
    assert full == layers * B * L * Hkv * d * 2 * item + 4 * B


def test_normalize_padding_left_right_and_none():
    ids = np.array([[0, 0, 5, 6, 7], [1, 2, 3, 0, 0], [4, 5, 6, 7, 8]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out, lengths, starts = normalize_padding(ids, mask)
    np.testing.assert_array_equal(out, [[5, 6, 7, 0, 0], [1, 2, 3, 0, 0], [4, 5, 6, 7, 8]])
    np.testing.assert_array_equal(lengths, [3, 3, 5])
    np.testing.assert_array_equal(starts, [2, 0, 0])
    out, lengths, _ = normalize_padding(ids[:2, 2:], mask[:2, 2:])
    assert out.shape == (2, 3) and lengths.tolist() == [3, 1]
    out, lengths, _ = normalize_padding(ids)
    np.testing.assert_array_equal(out, ids)


@pytest.mark.parametrize("ids,mask,match", [
    (np.zeros((1, 0), np.int32), None, "empty"),
    (np.ones((2, 3), np.int32), np.array([[1, 1, 1], [0, 0, 0]]), "empty prompt"),
    (np.ones((1, 4), np.int32), np.array([[1, 0, 1, 1]]), "contiguous"),
    (np.ones((1, 4), np.int32), np.array([[1, 2, 1, 1]]), "only 0"),
    (np.ones((4,), np.int32), None, r"\[batch, length\]"),
    (np.ones((1, 4), np.float32), None, "integer"),
    (np.ones((1, 4), np.int32), np.ones((1, 3)), "shape"),
])
def test_normalize_padding_rejects_bad_input(ids, mask, match):
    with pytest.raises(ValueError, match=match):
        normalize_padding(ids, mask)


@pytest.mark.parametrize("field,value,match", [
    ("attention", "sliding", "attention must be one of"),
    ("max_length", 0, "max_length must be an int >= 1"),
    ("group_size", 0, "group_size"),
    ("num_kv_heads", 3, "multiple of num_kv_heads"),
])
def test_cache_spec_rejects_bad_arguments(field, value, match):
    kwargs = dict(attention="cca", batch_size=1, max_length=10, num_layers=1, num_heads=4,
                  num_kv_heads=2, head_dim=8, group_size=4, window_size=4)
    kwargs[field] = value
    with pytest.raises(ValueError, match=match):
        CacheSpec(**kwargs)


def test_prefill_rejects_a_prompt_longer_than_the_cache():
    spec = _spec("cca", 1, 8, 2, 2, 8, 4, 4)
    q, k, v, _ = random_qkv(0, 1, 9, 2, 2, 8)
    with pytest.raises(ValueError, match="longer than the cache"):
        prefill_layer(spec, q, k, v, jnp.array([9]))


@pytest.mark.parametrize("B,T,H,Hkv,d,g,w,counts", [
    (2, 70, 4, 2, 16, 4, 8, (70, 41)),     # GQA, ragged rows, core tokens visible
    (1, 45, 2, 2, 8, 4, 10, (45,)),        # w % g != 0
    (2, 12, 2, 1, 8, 4, 16, (12, 5)),      # shorter than the window: no core token
])
def test_first_chunk_on_the_pallas_path_uses_the_cache_core_tokens_exactly(B, T, H, Hkv, d, g,
                                                                          w, counts):
    """The first prompt chunk on the Pallas path (interpret mode) takes its core tokens from
    the cache that prefill_layer built instead of pooling again: its output equals the op's
    own Pallas result and the reference on every real row (float32)."""
    from cca_jax import cca_attention
    from cca_jax.cache import CacheStep, attend_cached

    q, k, v, _ = random_qkv(T + g, B, T, H, Hkv, d)
    spec = dataclasses.replace(_spec("cca", B, T + 3 * g, H, Hkv, d, g, w), dtype="float32")
    step = CacheStep(start=jnp.zeros((B,), jnp.int32), count=jnp.asarray(counts, jnp.int32),
                     spec=spec, empty=True, all_real=False, interpret=True)
    out, cache = attend_cached(step, None, q, k, v, implementation="pallas")
    op = cca_attention(q, k, v, group_size=g, window_size=w, implementation="pallas",
                       interpret=True)
    ref = cca_reference(q, k, v, group_size=g, window_size=w, scale=1.0 / math.sqrt(d))
    for b, n in enumerate(counts):
        np.testing.assert_allclose(np.asarray(out[b, :n]), np.asarray(op[b, :n]), rtol=1e-6,
                                   atol=1e-6)
        np.testing.assert_allclose(np.asarray(out[b, :n]), np.asarray(ref[b, :n]), rtol=1e-5,
                                   atol=1e-5)
    expected = prefill_layer(spec, q, k, v, jnp.asarray(counts, jnp.int32))
    for name in ("core_k", "core_v", "raw_k", "raw_v"):
        np.testing.assert_array_equal(np.asarray(getattr(cache, name)),
                                      np.asarray(getattr(expected, name)), err_msg=name)
