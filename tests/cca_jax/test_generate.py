"""Cached generation against the uncached oracle, with a random model and with SmolLM2-135M.

Exactness (float32): greedy tokens with the cache equal `greedy_generate_uncached` (one full
forward pass per new token, no cache) row by row, and every logit vector that chose a new
token equals the full-sequence logits at that position within 1e-4. Prompts are shorter and
longer than w, decoding crosses group boundaries and the window edge (c(m) grows during
decoding), and the batch mixes prompt lengths with left or right padding.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cca_jax import LlamaConfig, LlamaForCausalLM
from cca_jax.generate import generate, greedy_generate_uncached
from cca_jax.generate.cli import main
from cca_kernels.visibility import visible_core_count

TOLERANCE = 1e-4


def _batch(prompts, side):
    """Pad a list of 1-D prompts to one [B, L] array (+ mask), on the given side."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), 7, np.int32)   # a real token id as padding
    mask = np.zeros_like(ids)
    for b, p in enumerate(prompts):
        cols = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[b, cols], mask[b, cols] = p, 1
    return ids, mask


def _full_sequence_logits(model, sequences):
    """Logits [B, T, vocab] of each 1-D sequence (one jitted batched forward pass; sequences
    are right-padded, which causal attention never looks at)."""
    width = max(len(x) for x in sequences)
    batch = np.zeros((len(sequences), width), np.int32)
    for b, x in enumerate(sequences):
        batch[b, :len(x)] = x
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    return np.asarray(forward(state, jnp.asarray(batch)))


_ORACLE_RUNS = {}


def _oracle(model, prompts, new_tokens):
    """greedy_generate_uncached on the prompts (one right-padded batch), remembered: the left-
    and right-padded batches of the same prompts share the oracle's run. Returns one 1-D
    array per prompt: the prompt and its new tokens."""
    key = (id(model), tuple(p.tobytes() for p in prompts), new_tokens)
    if key not in _ORACLE_RUNS:
        ids, _ = _batch(prompts, "right")
        lengths = [len(p) for p in prompts]
        out = greedy_generate_uncached(model, ids, new_tokens, prompt_lengths=lengths)
        _ORACLE_RUNS[key] = (model, [row[:n + new_tokens] for row, n in zip(out, lengths)])
    return _ORACLE_RUNS[key][1]


def _check_against_oracle(model, prompts, new_tokens, side, **kwargs):
    """Generate the batch with the cache; compare each row with the uncached oracle run on
    that row alone, and the logits with the full-sequence logits. Returns the worst logit
    difference."""
    ids, mask = _batch(prompts, side)
    out, logits = generate(model, ids, new_tokens, attention_mask=mask, return_logits=True,
                           **kwargs)
    assert out.shape == (len(prompts), ids.shape[1] + new_tokens) and out.dtype == np.int32
    assert logits.shape == (len(prompts), new_tokens, model.config.vocab_size)
    expected = _oracle(model, prompts, new_tokens)
    for b, prompt in enumerate(prompts):
        L = len(prompt)
        if side == "left":
            row = out[b, ids.shape[1] - L:]
            assert (out[b, :ids.shape[1] - L] == 7).all()
        else:
            row = out[b, :L + new_tokens]
            assert (out[b, L + new_tokens:] == 0).all()   # pad_token_id after the new tokens
        np.testing.assert_array_equal(row, expected[b], err_msg=f"row {b}")
    full = _full_sequence_logits(model, expected)
    worst = 0.0
    for b, prompt in enumerate(prompts):
        L = len(prompt)
        worst = max(worst, float(np.abs(logits[b] - full[b, L - 1:L - 1 + new_tokens]).max()))
    return worst


@pytest.fixture(scope="module")
def tiny_models():
    config = LlamaConfig(num_key_value_heads=2, attention="cca", group_size=4, window_size=16,
                         vocab_size=256, num_hidden_layers=2)
    return {attention: LlamaForCausalLM(config.replace(attention=attention), rngs=nnx.Rngs(0))
            for attention in ("cca", "full")}


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    # Shorter than w = 16 (5, 11), about w (16), longer than w + g (29).
    return [rng.integers(1, 256, n).astype(np.int32) for n in (5, 29, 16, 11)]


def test_oracle_batches_prompts_of_different_lengths_exactly(tiny_models, prompts):
    """The oracle's right-padded batch gives each row what that prompt alone gives."""
    model = tiny_models["cca"]
    ids, _ = _batch(prompts[:2], "right")
    together = greedy_generate_uncached(model, ids, 12, prompt_lengths=[5, 29])
    for row, prompt in zip(together, prompts[:2]):
        alone = greedy_generate_uncached(model, prompt[None], 12)[0]
        np.testing.assert_array_equal(row[:len(prompt) + 12], alone)
        assert (row[len(prompt) + 12:] == 0).all()
    with pytest.raises(ValueError, match="prompt_lengths must be 2 ints in"):
        greedy_generate_uncached(model, ids, 3, prompt_lengths=[0, 29])
    ids[1, 3] = 256   # outside the vocabulary: the jitted oracle would make NaN of it
    with pytest.raises(ValueError, match=r"input_ids holds token id 256 \(at index \(1, 3\)\)"):
        greedy_generate_uncached(model, ids, 3, prompt_lengths=[5, 29])


@pytest.mark.parametrize("side", ["left", "right"])
def test_random_model_cca_cache_is_exact(tiny_models, prompts, side):
    model = tiny_models["cca"]
    new_tokens = 30   # 5 + 30 crosses w, and 8 group boundaries, during decoding
    assert visible_core_count(5 - 1, 4, 16) == 0 < visible_core_count(5 + 30 - 2, 4, 16)
    worst = _check_against_oracle(model, prompts, new_tokens, side)
    print(f"random model, {side} padding: max |logit difference| {worst:.2e}")
    assert worst < TOLERANCE, worst


def test_random_model_window_not_multiple_of_group(prompts):
    config = LlamaConfig(num_key_value_heads=1, num_attention_heads=4, attention="cca",
                         group_size=3, window_size=10, num_hidden_layers=2)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(1))
    worst = _check_against_oracle(model, prompts[:2], 20, "left")
    print(f"random model, g=3, w=10: max |logit difference| {worst:.2e}")
    assert worst < TOLERANCE, worst


def test_random_model_full_cache_is_exact(tiny_models, prompts):
    worst = _check_against_oracle(tiny_models["full"], prompts[:3], 12, "right")
    print(f"random model, full cache: max |logit difference| {worst:.2e}")
    assert worst < TOLERANCE, worst


def test_attention_argument_overrides_the_model_config(tiny_models, prompts):
    """attention="full" on a CCA-configured model is the full model's generation; and the two
    attentions really differ on these lengths (so the exactness tests above can fail)."""
    ids, mask = _batch(prompts, "left")
    as_full = generate(tiny_models["cca"], ids, 10, attention="full", attention_mask=mask)
    np.testing.assert_array_equal(as_full, generate(tiny_models["full"], ids, 10,
                                                    attention_mask=mask))
    sequence = jnp.asarray(as_full[1:2])
    difference = np.abs(np.asarray(tiny_models["cca"](sequence))
                        - np.asarray(tiny_models["full"](sequence)))
    assert difference[0, :16].max() < 1e-5            # inside the window CCA is causal
    assert difference[0, 20:].max() > 100 * TOLERANCE


def test_sampling_is_seeded_and_top_p_to_zero_is_greedy(tiny_models, prompts):
    model = tiny_models["cca"]
    ids = prompts[1][None]
    a = generate(model, ids, 12, temperature=1.0, seed=3)
    b = generate(model, ids, 12, temperature=1.0, seed=3)
    c = generate(model, ids, 12, temperature=1.0, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = generate(model, ids, 12)
    np.testing.assert_array_equal(generate(model, ids, 12, temperature=0.7, top_p=1e-6), greedy)


def test_zero_new_tokens_returns_the_prompt(tiny_models, prompts):
    ids = prompts[0][None]
    np.testing.assert_array_equal(generate(tiny_models["cca"], ids, 0), ids)


@pytest.mark.parametrize("kwargs,match", [
    (dict(input_ids=np.zeros((1, 0), np.int32)), "empty"),
    (dict(attention_mask=np.zeros((1, 5), np.int32)), "empty prompt"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be an int >= 0"),
    (dict(max_length=4), "longer than the cache"),
    (dict(max_length=6), "need a cache of 9 positions"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(attention="sparse"), "attention must be one of"),
    (dict(decode_implementation="cuda"), "decode implementation"),
    (dict(input_ids=np.array([[1, 2, 256]], np.int32)),
     r"input_ids holds token id 256.*\[0, 256\)"),
    (dict(input_ids=np.array([[-1, 2, 3]], np.int32)),
     r"input_ids holds token id -1.*vocab_size=256"),
])
def test_bad_input_is_a_clear_error(tiny_models, kwargs, match):
    args = dict(model=tiny_models["cca"], input_ids=np.arange(1, 6, dtype=np.int32)[None],
                max_new_tokens=5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(**args)


# ---------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct, computed in float32.

SMOL_TEXT = ("Anna keeps a notebook of small facts. On Monday she wrote that the bakery on "
             "Elm Street opens at seven, that her neighbour's dog is called Biscuit, and that "
             "the train to the coast leaves from platform four. On Tuesday she added that the "
             "library closes early on Fridays.")


@pytest.fixture(scope="module")
def smollm2_dir(smollm2_hf_dir):
    return smollm2_hf_dir      # bfloat16 weights, loaded as float32 below


@pytest.fixture(scope="module")
def smollm2_prompts(smollm2_dir):
    from cca_jax.loading import load_tokenizer
    ids = np.asarray(load_tokenizer(smollm2_dir)(SMOL_TEXT)["input_ids"], np.int32)
    assert 55 <= len(ids) <= 70, len(ids)
    return [ids, ids[-20:]]          # ~60 tokens (> w = 32) and 20 tokens (< w)


def test_smollm2_cca_cache_is_exact(smollm2_dir, smollm2_prompts):
    """g = 8, w = 32, 30 new tokens: the 20-token prompt crosses the window edge during
    decoding (c(m) > 0 from m = 39), both rows cross group boundaries."""
    from cca_jax import from_pretrained
    model = from_pretrained(smollm2_dir, attention="cca", group_size=8, window_size=32,
                            dtype="float32", param_dtype="float32")
    worst = _check_against_oracle(model, smollm2_prompts, 30, "left")
    print(f"SmolLM2-135M: max |logit difference| {worst:.2e}")
    assert worst < TOLERANCE, worst


def _run_cli(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def tiny_converted_dir(smollm2_dir, tmp_path_factory):
    """A small random model with SmolLM2's vocabulary and tokenizer, in our converted format
    (the CLI path without 30 layers of compile time)."""
    from cca_jax.converted import save_converted
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True, eos_token_id=2)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return save_converted(tmp_path_factory.mktemp("tiny") / "model", params, config,
                          tokenizer_src=smollm2_dir)


def test_cli_streams_text_and_reports(tiny_converted_dir, tmp_path, capsys):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(SMOL_TEXT, encoding="utf-8")
    code, out, err = _run_cli(capsys, [
        "--model", str(tiny_converted_dir), "--prompt-file", str(prompt_file),
        "--max-new-tokens", "12", "--attention", "cca", "--group-size", "4",
        "--window-size", "16", "--ignore-eos"])
    assert code == 0, err
    assert out.strip(), "no text streamed"
    assert "prefill: " in err and "tokens/s" in err and "a full cache would take" in err
    assert "decode: 12 tokens, 11 decode steps" in err
    # The streamed text is the decoded greedy continuation.
    from cca_jax import from_pretrained
    from cca_jax.loading import load_tokenizer
    tokenizer = load_tokenizer(tiny_converted_dir)
    model = from_pretrained(tiny_converted_dir, attention="cca", group_size=4, window_size=16)
    ids = np.asarray(tokenizer(SMOL_TEXT)["input_ids"], np.int32)[None]
    expected = generate(model, ids, 12)[0, ids.shape[1]:]
    assert out == tokenizer.decode(expected, skip_special_tokens=True) + "\n"


def test_cli_sampling_and_full_attention(tiny_converted_dir, capsys):
    code, out, err = _run_cli(capsys, [
        "--model", str(tiny_converted_dir), "--prompt", "Hello there", "--max-new-tokens", "5",
        "--attention", "full", "--temperature", "0.8", "--top-p", "0.9", "--seed", "1",
        "--ignore-eos"])
    assert code == 0, err
    assert "attention=full" in err and "decode: 5 tokens" in err


def test_cli_zero_new_tokens_reports_no_nan(tiny_converted_dir, capsys):
    code, out, err = _run_cli(capsys, ["--model", str(tiny_converted_dir), "--prompt",
                                       "Hello there", "--max-new-tokens", "0"])
    assert code == 0, err
    assert out == "\n"
    assert "nan" not in err.lower() and "prefill: not run" in err and "decode: 0 tokens" in err


def test_closing_report_wording(tiny_models):
    """No `nan tokens/s` for one new token (no decode step), and a CCA cache larger than a
    full one says `% more`, not `-x% less` (it happens just past w + g positions when
    H / Hkv > g / 2: core tokens are kept per query head; here the sizes are set by hand)."""
    from cca_jax.generate import CachedGeneration
    from cca_jax.generate.cli import closing_report
    session = CachedGeneration(tiny_models["cca"], np.arange(1, 6, dtype=np.int32)[None], 1)
    stats = session.stats
    assert stats.cache_bytes == stats.full_cache_bytes      # 5 positions: all of them raw
    stats.cache_bytes = stats.full_cache_bytes + 1000
    stats.new_tokens, stats.prefill_s = 1, 0.5
    prefill, decode, cache = closing_report(stats, session.spec.max_length)
    assert "nan" not in decode and "no decode step" in decode
    more = 100 * (stats.cache_bytes / stats.full_cache_bytes - 1)
    assert cache.endswith(f": {more:.1f}% more") and "-" not in cache.split(":")[-1]
    long = CachedGeneration(tiny_models["cca"], np.ones((1, 200), np.int32), 1).stats
    assert closing_report(long, 200)[-1].endswith("% less")


@pytest.fixture(scope="module")
def small_vocab_dir(smollm2_dir, tmp_path_factory):
    """A random model whose vocabulary (256) is far smaller than its tokenizer's (49152)."""
    from cca_jax.converted import save_converted
    config = LlamaConfig(vocab_size=256, num_hidden_layers=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return save_converted(tmp_path_factory.mktemp("small-vocab") / "model", params, config,
                          tokenizer_src=smollm2_dir)


def test_cli_tokenizer_larger_than_the_vocabulary_is_an_error(small_vocab_dir, capsys):
    code, out, err = _run_cli(capsys, ["--model", str(small_vocab_dir), "--prompt",
                                       "Hello there", "--max-new-tokens", "4"])
    assert code == 2 and out == ""
    assert err.startswith("error: ") and "49152 tokens" in err and "vocabulary has 256" in err
    assert "--tokenizer DIR" in err


def test_cli_prompt_that_is_not_utf8_text(tiny_converted_dir, tmp_path, capsys):
    base = ["--model", str(tiny_converted_dir), "--max-new-tokens", "2"]
    # What Python makes of the argument bytes b"caf\xff" (surrogateescape).
    not_utf8 = b"caf\xff".decode("utf-8", "surrogateescape")
    code, out, err = _run_cli(capsys, base + ["--prompt", not_utf8])
    assert code == 2 and out == ""
    assert err.startswith("error: --prompt is not UTF-8 text (byte 0xff at character 3)"), err
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9".encode("latin-1"))
    code, out, err = _run_cli(capsys, base + ["--prompt-file", str(latin1)])
    assert code == 2 and out == ""
    assert err.startswith(f"error: --prompt-file {str(latin1)!r} is not UTF-8 text"), err
    code, out, err = _run_cli(capsys, base + ["--prompt-file", str(tmp_path)])
    assert code == 2 and out == ""
    assert "is a directory; expected a UTF-8 text file" in err and "does not exist" not in err


@pytest.mark.parametrize("extra,match", [
    (["--max-new-tokens", "-1"], "max_new_tokens must be an int >= 0"),
    (["--prompt", "   "], "the prompt is empty"),
    (["--tokenizer", "/nonexistent/tokenizer"], "tokenizer directory"),
    (["--max-length", "1"], "longer than the cache"),
    (["--max-length", "3"], "need a cache of 5 positions"),
    (["--top-p", "1.5"], "top_p"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "does not exist"),
])
def test_cli_bad_input_is_a_clear_error_with_nothing_written(tiny_converted_dir, capsys,
                                                             extra, match):
    argv = ["--model", str(tiny_converted_dir), "--max-new-tokens", "4", "--prompt", "Hello there"]
    for i in range(0, len(extra), 2):
        if extra[i] in argv:
            argv[argv.index(extra[i]) + 1] = extra[i + 1]
        elif extra[i] == "--prompt-file":
            j = argv.index("--prompt")
            argv[j:j + 2] = extra[i:i + 2]
        else:
            argv += extra[i:i + 2]
    code, out, err = _run_cli(capsys, argv)
    assert code == 2
    assert out == ""
    assert match in err and err.startswith("error: ")


def test_cli_model_directory_without_tokenizer(smollm2_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).symlink_to(smollm2_dir / name)
    code, out, err = _run_cli(capsys, ["--model", str(bare), "--prompt", "Hi",
                                       "--max-new-tokens", "2"])
    assert code == 2 and out == "" and "no tokenizer files" in err


def test_package_level_generate_and_cli_module():
    import subprocess
    import sys

    import cca_jax
    assert callable(cca_jax.generate)
    model_ids = np.array([[1, 2, 3]], np.int32)
    model = LlamaForCausalLM(LlamaConfig(attention="cca", group_size=2, window_size=2),
                             rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(cca_jax.generate(model, model_ids, 4),
                                  generate(model, model_ids, 4))
    result = subprocess.run([sys.executable, "-m", "cca_jax.generate", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--max-new-tokens" in result.stdout
    assert "RuntimeWarning" not in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------
# Chunked prefill, decoding on the device, end-of-sequence.


@pytest.mark.parametrize("attention", ["cca", "full"])
def test_chunked_prefill_equals_one_shot_prefill(tiny_models, prompts, attention):
    """The prompt in chunks of 1, 6 or 13 columns (ragged rows: some end inside a chunk,
    some have nothing left in later chunks) gives the logits of the one-shot prefill within
    1e-5 (float32), and the cache they leave decodes the same next logits."""
    from cca_jax import cache as cache_lib

    model = tiny_models[attention]
    ids, _ = _batch(prompts, "right")
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    spec = cache_lib.CacheSpec.for_model(model.config, len(prompts), ids.shape[1] + 4)
    graphdef, state = nnx.split(model)

    def run(chunk):
        @jax.jit
        def prefill_then_step(state, ids):
            m = nnx.merge(graphdef, state)
            logits, cache = cache_lib.prefill(m, spec, ids, lengths, chunk_size=chunk)
            following, _ = cache_lib.decode_step(m, cache, jnp.argmax(logits, -1))
            return logits, following
        return [np.asarray(x) for x in prefill_then_step(state, jnp.asarray(ids))]

    one_shot = run(None)
    for chunk in (1, 6, 13):
        for got, expected in zip(run(chunk), one_shot):
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5,
                                       err_msg=f"chunk {chunk}")


def test_small_prefill_and_decode_chunks_are_exact(tiny_models, prompts):
    """Prompt chunks of 6 columns and 5 decode steps per device call: still the oracle's
    tokens and logits (the loop's stopping and restarting between calls loses nothing)."""
    worst = _check_against_oracle(tiny_models["cca"], prompts, 17, "left", prefill_chunk=6,
                                  decode_chunk=5)
    assert worst < TOLERANCE, worst


def test_sampling_does_not_depend_on_the_decode_chunk(tiny_models, prompts):
    ids = prompts[1][None]
    one = generate(tiny_models["cca"], ids, 9, temperature=1.0, seed=5, decode_chunk=1)
    many = generate(tiny_models["cca"], ids, 9, temperature=1.0, seed=5, decode_chunk=32)
    np.testing.assert_array_equal(one, many)


def test_end_of_sequence_ends_rows_on_the_device(tiny_models, prompts):
    """A row that produces an end-of-sequence id gets pad tokens after it, the other rows go
    on unchanged; when every row has ended, decoding stops (fewer device calls). Sampled
    (seeded), so that the tokens vary; the same seed gives the same tokens until the end."""
    from cca_jax.generate import CachedGeneration

    model = tiny_models["cca"]
    ids, mask = _batch(prompts[:2], "right")
    sampling = dict(temperature=1.0, seed=11, decode_chunk=4)
    free = generate(model, ids, 12, attention_mask=mask, **sampling)
    L = [len(p) for p in prompts[:2]]
    row0 = free[0, L[0]:L[0] + 12].tolist()
    end = next(i for i in range(2, 12) if row0[i] not in row0[:i]) + 1   # tokens up to eos
    eos = row0[end - 1]
    stopped = generate(model, ids, 12, attention_mask=mask, eos_token_ids=[eos],
                       pad_token_id=1, **sampling)
    assert stopped[0, L[0]:L[0] + end].tolist() == row0[:end]
    assert (stopped[0, L[0] + end:L[0] + 12] == 1).all()
    row1 = free[1, L[1]:L[1] + 12].tolist()
    end1 = row1.index(eos) + 1 if eos in row1 else 12
    assert stopped[1, L[1]:L[1] + end1].tolist() == row1[:end1]
    assert (stopped[1, L[1] + end1:L[1] + 12] == 1).all()
    # Row 0 alone: it ends at token `end`, so the decode calls stop there.
    session = CachedGeneration(model, prompts[0][None], 12, eos_token_ids=[eos], **sampling)
    tokens = [int(t[0]) for t in session]
    assert tokens == row0[:end]
    assert session.stats.new_tokens == end
    assert session.stats.decode_calls == -(-(end - 1) // 4) < -(-11 // 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(prefill_chunk=0), "prefill_chunk must be an int >= 1"),
    (dict(decode_chunk=0), "decode_chunk must be an int >= 1"),
    (dict(eos_token_ids=[256]), "eos_token_ids must be token ids"),
    (dict(pad_token_id=-1), "pad_token_id must be a token id"),
])
def test_bad_chunk_and_stop_arguments_are_clear_errors(tiny_models, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny_models["cca"], np.arange(1, 6, dtype=np.int32)[None], 5, **kwargs)


def test_auto_prefill_chunk_and_largest_batch_follow_memory(tiny_models):
    from cca_jax.cache import CacheSpec, cache_bytes_for
    from cca_jax.generate import (CPU_PREFILL_CHUNK, activation_bytes_per_token,
                                  auto_prefill_chunk, largest_batch, prefill_fixed_bytes)

    config = tiny_models["cca"].config
    spec = CacheSpec.for_model(config, 2, 1000)
    per_token = activation_bytes_per_token(config)
    fixed = prefill_fixed_bytes(config)
    assert fixed > 0
    assert auto_prefill_chunk(config, spec, memory=None) in (CPU_PREFILL_CHUNK,
                                                             auto_prefill_chunk(config, spec))
    limit = cache_bytes_for(spec) + (2 * 10_000 * per_token + fixed) / 0.9
    chunk = auto_prefill_chunk(config, spec, memory=(limit + 2 * per_token, 0), multiple=100)
    assert chunk == 10_000    # 90% of the room left by the cache, less the fixed part, 2 rows
    assert auto_prefill_chunk(config, spec, memory=(cache_bytes_for(spec), 0)) == 512
    one = cache_bytes_for(CacheSpec.for_model(config, 1, 1000)) + 512 * per_token
    room = (10 * one + fixed) / 0.95
    assert largest_batch(config, 1000, memory=(room + 100, 0)) == 10
    assert largest_batch(config, 1000, memory=(room - 100, 0)) == 9
    assert largest_batch(config, 1000, memory=(room, room)) == 0
    full_one = cache_bytes_for(CacheSpec.for_model(config, 1, 1000, "full")) + 512 * per_token
    assert largest_batch(config, 1000, "full", memory=(room, 0)) == int(
        (0.95 * room - fixed) // full_one)


def test_automatic_prefill_chunks_are_even():
    """The automatic chunk width (CPU: CPU_PREFILL_CHUNK) is spread over the chunks it needs:
    5,000 columns take two chunks of 2,560, not 4,096 + 904 (3,192 columns of padding);
    an explicit prefill_chunk is kept as given."""
    from cca_jax.generate import CPU_PREFILL_CHUNK, CachedGeneration

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         attention="cca", group_size=4, window_size=8)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    ids = np.ones((1, 5000), np.int32)
    assert CPU_PREFILL_CHUNK == 4096
    auto = CachedGeneration(model, ids, 1)
    assert (auto.chunk_width, auto.n_chunks) == (2560, 2)
    given = CachedGeneration(model, ids, 1, prefill_chunk=4096)
    assert (given.chunk_width, given.n_chunks) == (4096, 2)
