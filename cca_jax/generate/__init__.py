"""Token generation: cached decoding (`generate`) and the uncached greedy oracle.

`generate(model, input_ids, max_new_tokens, temperature=0.0, top_p=1.0, seed=0,
attention=None)` fills a `cca_jax.cache.DecodeCache` (the compressed CCA cache of
docs/cca.md §5, or a full cache with attention="full") with the prompt, chunk by chunk
(`prefill_chunk` columns per jitted call, so that activations follow the chunk and not the
prompt), then decodes on the device, `decode_chunk` tokens per jitted call (a
`lax.while_loop` with sampling and end-of-sequence stopping inside; the cache is donated
and updated in place). Every call runs the model's own forward pass with the cache threaded
through its layers. Shapes are static (the cache is preallocated), so each function compiles
once per (batch, chunk width, cache length). Batches of prompts of different lengths come
with an `attention_mask` (left or right padding).

`greedy_generate_uncached` is jitted once for the final length (positions after the current
one are padding that causal and CCA attention never look at), so it costs one full forward
pass per new token. It is the exactness oracle for cached decoding.

`python -m cca_jax.generate` runs the command line of `cca_jax/generate/cli.py` (the
package is also callable: `cca_jax.generate(model, ids, n)` is `generate(model, ids, n)`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import sys
import types
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cca_jax.cache import (CacheSpec, _check_int, cache_bytes_by_kind, cache_bytes_for,
                           init_cache, normalize_padding, prefill_chunk,
                           resolve_decode_implementation)
from cca_jax.llama import check_token_ids


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (temperature 0) or nucleus sampling."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        t, p = self.temperature, self.top_p
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not (
                math.isfinite(t) and t >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {p!r}")
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(p))


def sample_next_token(logits, key, temperature, top_p):
    """Next token ids [B] int32 from float32 logits [B, vocab]; temperature and top_p are
    (traced) scalars, so one compiled step serves every setting. Temperature 0 is greedy
    (argmax; the sampling branch is not executed)."""
    logits = logits.astype(jnp.float32)

    def nucleus(scaled):
        # Keep the smallest set of most likely tokens whose probability reaches top_p.
        ordered = jnp.sort(scaled, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(scaled >= threshold, scaled, -jnp.inf)

    def sample(logits):
        scaled = logits / jnp.maximum(temperature, 1e-6)
        scaled = jax.lax.cond(top_p < 1.0, nucleus, lambda x: x, scaled)
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

    def greedy(logits):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, greedy, logits)


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "empty"),
                   donate_argnames=("cache",))
def _prefill_chunk_jit(graphdef, state, cache, logits, ids, lengths, first, *, spec, empty):
    """One prompt chunk (`cca_jax.cache.prefill_chunk`); the first makes the cache."""
    if empty:
        cache = init_cache(spec)
    return prefill_chunk(nnx.merge(graphdef, state), cache, logits, ids, lengths, first,
                         empty=empty)


@jax.jit
def _first_token_jit(logits, key, temperature, top_p):
    return sample_next_token(logits, jax.random.fold_in(key, 0), temperature, top_p)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "implementation", "interpret",
                                             "keep_logits"),
                   donate_argnames=("cache",))
def _decode_chunk_jit(graphdef, state, cache, tokens, done, key, generated, n, temperature,
                      top_p, eos, pad, *, steps, implementation, interpret, keep_logits):
    """Up to n (<= steps) decode steps on the device, without returning to the host: each
    appends the last tokens [B], samples the next ones and marks rows that produced an
    end-of-sequence id (in eos) as done; done rows produce `pad`. Stops early when every row
    is done. Returns (tokens [B, steps], steps taken, cache, last tokens, done, logits)."""
    model = nnx.merge(graphdef, state)
    B = tokens.shape[0]
    out = jnp.full((B, steps), pad, jnp.int32)
    kept = (jnp.zeros((B, steps, model.config.vocab_size), jnp.float32) if keep_logits
            else jnp.zeros((), jnp.float32))

    def cond(carry):
        i, _, _, done, _, _ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, cache, tokens, done, out, kept = carry
        logits, cache = model(tokens[:, None], cache=cache,
                              decode_implementation=implementation, interpret=interpret)
        following = sample_next_token(logits, jax.random.fold_in(key, generated + i),
                                      temperature, top_p)
        following = jnp.where(done, pad, following)
        out = jax.lax.dynamic_update_index_in_dim(out, following, i, axis=1)
        if keep_logits:
            kept = jax.lax.dynamic_update_index_in_dim(kept, logits, i, axis=1)
        done = done | jnp.any(following[:, None] == eos[None, :], axis=1)
        return i + 1, cache, following, done, out, kept

    i, cache, tokens, done, out, kept = jax.lax.while_loop(
        cond, body, (jnp.int32(0), cache, tokens, done, out, kept))
    return out, i, cache, tokens, done, kept


def _check_max_new_tokens(max_new_tokens) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or (
            max_new_tokens < 0):
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")


@dataclasses.dataclass
class GenerationStats:
    prompt_tokens: int = 0          # longest prompt in the batch
    new_tokens: int = 0             # tokens generated per sequence so far
    compile_s: float = 0.0          # compiling prefill + decode (not in the timings)
    prefill_s: float = 0.0          # prefill, first token included
    prefill_chunks: int = 0         # prompt chunks the prefill ran
    decode_s: float = 0.0           # decoding: from each chunk's call to its tokens on the host
    decode_calls: int = 0           # device calls the decoding took (each many tokens)
    cache_bytes: int = 0            # read from the cache's arrays
    full_cache_bytes: int = 0       # what a full cache of the same length would allocate
    # {"cca" / "full": (layers, bytes)}: the cache's layers of each kind (a hybrid has both)
    cache_bytes_by_kind: dict = dataclasses.field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode steps per second per sequence (the first token comes from the prefill)."""
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else float("nan")


# Peak memory of a prefill chunk beyond the weights and the cache, read from the compiled
# programs' memory analysis on an H200 (LLaMA2-7B shape, bf16, 2026-12-04; CCA and full, the
# first chunk or a later one; measurements in cca_kernels/NOTES.md): about 100 KB per
# prompt token, i.e. 3.3-3.5 bytes per (hidden + intermediate) value of the model dtype, plus
# a fixed part that grows with the number of layers, about 0.64 x the layers' weight bytes
# (XLA merges the projections that share an input and keeps the merged weights for the whole
# program): 1.6 GiB of temporaries for 2 layers at 16K tokens, 9.1 GiB for 32 layers.
ACTIVATION_BYTES_PER_WIDTH = 4
FIXED_WEIGHT_FRACTION = 0.75
CPU_PREFILL_CHUNK = 4096


def activation_bytes_per_token(config) -> int:
    """Estimated activation bytes per prompt token of a prefill chunk (see
    ACTIVATION_BYTES_PER_WIDTH)."""
    itemsize = jnp.dtype(config.dtype).itemsize
    return ACTIVATION_BYTES_PER_WIDTH * itemsize * (config.hidden_size
                                                    + config.intermediate_size)


def prefill_fixed_bytes(config) -> int:
    """Estimated part of a prefill chunk's temporaries that does not depend on its width:
    FIXED_WEIGHT_FRACTION of the decoder layers' weights in the model dtype."""
    hidden, d = config.hidden_size, config.head_size
    heads, kv_heads = config.num_attention_heads, config.kv_heads
    per_layer = (hidden * (heads + 2 * kv_heads) * d + heads * d * hidden
                 + 3 * hidden * config.intermediate_size)
    weights = config.num_hidden_layers * per_layer * jnp.dtype(config.dtype).itemsize
    return int(FIXED_WEIGHT_FRACTION * weights)


def device_memory_bytes() -> tuple[int, int] | None:
    """(bytes the first device may allocate, bytes in use), or None where the backend does
    not say (the CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))


def auto_prefill_chunk(config, spec: CacheSpec, memory: tuple[int, int] | None = None,
                       *, multiple: int = 512) -> int:
    """Prompt columns per prefill chunk: on an accelerator, the widest multiple of
    `multiple` whose estimated temporaries (`prefill_fixed_bytes` + batch x columns x
    `activation_bytes_per_token`) fit in 90% of the memory left once the cache is allocated
    (the weights are already in use); at least `multiple`. Without memory statistics (the
    CPU): CPU_PREFILL_CHUNK."""
    memory = device_memory_bytes() if memory is None else memory
    if memory is None:
        return CPU_PREFILL_CHUNK
    limit, in_use = memory
    free = 0.9 * (limit - in_use - cache_bytes_for(spec)) - prefill_fixed_bytes(config)
    columns = int(max(free, 0) // (spec.batch_size * activation_bytes_per_token(config)))
    return max(multiple, columns // multiple * multiple)


def largest_batch(config, max_length: int, attention: str | None = None,
                  memory: tuple[int, int] | None = None, *, prefill_columns: int = 512) -> int:
    """The largest batch whose caches of `max_length` positions, plus the temporaries of a
    prefill chunk of `prefill_columns` columns (estimated: `prefill_fixed_bytes` once and
    `activation_bytes_per_token` per row and column), fit in 95% of the device memory left
    beside what is in use now (load the weights first).
    memory: (bytes the device may allocate, bytes in use), default read from the first
    device. 0 when not even one sequence fits."""
    memory = device_memory_bytes() if memory is None else memory
    if memory is None:
        raise ValueError("this backend reports no memory limit; pass memory=(limit, in_use)")
    limit, in_use = memory
    one = CacheSpec.for_model(config, 1, max_length, attention)
    per_sequence = cache_bytes_for(one) + prefill_columns * activation_bytes_per_token(config)
    room = 0.95 * (limit - in_use) - prefill_fixed_bytes(config)
    return max(0, int(room // per_sequence))


class CachedGeneration:
    """One cached generation run: iterate to get each step's new token ids [B] (numpy int32).

    The prompt goes through the model in chunks of `prefill_chunk` columns that append to
    the cache (peak activations follow the chunk, not the prompt; None: the widest chunk
    that `auto_prefill_chunk` finds room for); decoding runs on the
    device `decode_chunk` tokens per call (a `lax.while_loop`: the cache donated and updated
    in place, sampling and the end-of-sequence check on the device), and the host receives
    each call's tokens at once. Rows that produce one of `eos_token_ids` are done: their
    later tokens are `pad_token_id`, and decoding stops when every row is done.
    Everything is validated in the constructor, before any device work; `compile()` (called
    on first use) compiles the functions ahead of time.
    """

    def __init__(self, model, input_ids, max_new_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, attention: str | None = None,
                 attention_mask=None, max_length: int | None = None,
                 decode_implementation: str = "auto", interpret: bool = False,
                 prefill_chunk: int | None = None, decode_chunk: int = 32, eos_token_ids=(),
                 pad_token_id: int = 0):
        _check_max_new_tokens(max_new_tokens)
        self.sampling = Sampling(temperature, top_p)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if prefill_chunk is not None:
            _check_int("prefill_chunk", prefill_chunk)
        _check_int("decode_chunk", decode_chunk)
        self.decode_chunk = int(decode_chunk)
        config = model.config
        eos = sorted({int(t) for t in np.atleast_1d(np.asarray(eos_token_ids, np.int64))})
        if any(t < 0 or t >= config.vocab_size for t in eos):
            raise ValueError(f"eos_token_ids must be token ids in [0, {config.vocab_size}), "
                             f"got {list(eos_token_ids)!r}")
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, numbers.Integral) or (
                not 0 <= pad_token_id < config.vocab_size):
            raise ValueError(f"pad_token_id must be a token id in [0, {config.vocab_size}), "
                             f"got {pad_token_id!r}")
        self.eos = np.asarray(eos or [-1], np.int32)    # -1 never matches a token
        self.pad = int(pad_token_id)
        self.ids, self.lengths, self.starts = normalize_padding(input_ids, attention_mask)
        check_token_ids(self.ids, config.vocab_size)   # padding is zeros here
        B, width = self.ids.shape
        needed = width + max(int(max_new_tokens) - 1, 0)   # the last new token is not cached
        if max_length is None:
            max_length = needed
        elif isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral) or (
                max_length < 1):
            raise ValueError(f"max_length must be an int >= 1 or None, got {max_length!r}")
        if width > max_length:
            raise ValueError(f"the prompt ({width} tokens) is longer than the cache "
                             f"(max_length={max_length})")
        if needed > max_length:
            raise ValueError(f"the prompt ({width} tokens) plus {max_new_tokens} new tokens need "
                             f"a cache of {needed} positions, but max_length is {max_length}")
        self.spec = CacheSpec.for_model(config, B, int(max_length), attention)
        self.implementation = resolve_decode_implementation(decode_implementation,
                                                            self.spec.head_dim)
        self.interpret = bool(interpret)
        self.max_new_tokens = int(max_new_tokens)
        self.prefill_chunk = (int(prefill_chunk) if prefill_chunk is not None
                              else auto_prefill_chunk(config, self.spec))
        # Prompt chunks of equal width (the last padded): one compiled chunk function. The
        # automatic width is spread evenly over the chunks it needs (a multiple of 128), so
        # that the last chunk is not mostly padding.
        self.chunk_width = min(self.prefill_chunk, width)
        self.n_chunks = -(-width // self.chunk_width)
        if prefill_chunk is None and self.n_chunks > 1:
            even = -(-width // self.n_chunks)
            self.chunk_width = min(-(-even // 128) * 128, self.chunk_width)
            self.n_chunks = -(-width // self.chunk_width)
        self.graphdef, self.state = nnx.split(model)
        self.key = jax.random.PRNGKey(int(seed))
        self.stats = GenerationStats(prompt_tokens=width, cache_bytes=cache_bytes_for(self.spec),
                                     full_cache_bytes=cache_bytes_for(
                                         dataclasses.replace(self.spec, attention="full")),
                                     cache_bytes_by_kind=cache_bytes_by_kind(self.spec))
        self._compiled = None
        self.logits: list[np.ndarray] = []   # filled when keep_logits is set
        self.keep_logits = False

    def _chunk_ids(self, index: int):
        first = index * self.chunk_width
        ids = self.ids[:, first:first + self.chunk_width]
        if ids.shape[1] < self.chunk_width:
            ids = np.pad(ids, ((0, 0), (0, self.chunk_width - ids.shape[1])))
        return jnp.asarray(ids), jnp.int32(first)

    def compile(self) -> float:
        """Compile the prefill chunk(s), the first-token sampler and the decode loop ahead of
        time (or find them in jax's caches); returns the seconds it took."""
        if self._compiled is None:
            start = time.perf_counter()
            ids, first = self._chunk_ids(0)
            lengths = jnp.asarray(self.lengths)
            scalar = jax.ShapeDtypeStruct((), jnp.float32)
            integer = jax.ShapeDtypeStruct((), jnp.int32)
            first_fn = _prefill_chunk_jit.lower(self.graphdef, self.state, None, None, ids,
                                                lengths, integer, spec=self.spec,
                                                empty=True).compile()
            logits_shape, cache_shape = first_fn.out_info
            next_fn = None
            if self.n_chunks > 1:
                next_fn = _prefill_chunk_jit.lower(
                    self.graphdef, self.state, cache_shape, logits_shape, ids, lengths, integer,
                    spec=self.spec, empty=False).compile()
            sample_fn = _first_token_jit.lower(logits_shape, self.key, scalar, scalar).compile()
            tokens = jax.ShapeDtypeStruct((self.spec.batch_size,), jnp.int32)
            done = jax.ShapeDtypeStruct((self.spec.batch_size,), jnp.bool_)
            decode_fn = _decode_chunk_jit.lower(
                self.graphdef, self.state, cache_shape, tokens, done, self.key, integer,
                integer, scalar, scalar, jnp.asarray(self.eos), integer,
                steps=self.decode_chunk, implementation=self.implementation,
                interpret=self.interpret, keep_logits=self.keep_logits).compile()
            self._compiled = (first_fn, next_fn, sample_fn, decode_fn)
            self.stats.compile_s = time.perf_counter() - start
        return self.stats.compile_s

    def __iter__(self):
        if self.max_new_tokens == 0:
            return
        self.compile()
        first_fn, next_fn, sample_fn, decode_fn = self._compiled
        self.logits = []
        stats = self.stats
        stats.decode_s, stats.decode_calls, stats.new_tokens = 0.0, 0, 0
        start = time.perf_counter()
        temperature = jnp.float32(self.sampling.temperature)
        top_p = jnp.float32(self.sampling.top_p)
        lengths = jnp.asarray(self.lengths)
        ids, first = self._chunk_ids(0)
        logits, cache = first_fn(self.state, None, None, ids, lengths, first)
        for index in range(1, self.n_chunks):
            ids, first = self._chunk_ids(index)
            logits, cache = next_fn(self.state, cache, logits, ids, lengths, first)
        tokens = sample_fn(logits, self.key, temperature, top_p)
        host_tokens = np.asarray(tokens)
        stats.prefill_s = time.perf_counter() - start
        stats.prefill_chunks = self.n_chunks
        stats.new_tokens = 1
        if self.keep_logits:
            self.logits.append(np.asarray(logits))
        done_host = np.isin(host_tokens, self.eos)
        done = jnp.asarray(done_host)
        eos, pad = jnp.asarray(self.eos), jnp.int32(self.pad)
        yield host_tokens
        while stats.new_tokens < self.max_new_tokens and not done_host.all():
            n = min(self.decode_chunk, self.max_new_tokens - stats.new_tokens)
            # Timed from the call to its tokens on the host; the time the consumer spends
            # between two chunks (printing, ...) is not counted.
            start = time.perf_counter()
            out, taken, cache, tokens, done, kept = decode_fn(
                self.state, cache, tokens, done, self.key, jnp.int32(stats.new_tokens),
                jnp.int32(n), temperature, top_p, eos, pad)
            out, taken = np.asarray(out), int(taken)
            done_host = np.asarray(done)
            stats.decode_s += time.perf_counter() - start
            stats.decode_calls += 1
            if self.keep_logits:
                kept = np.asarray(kept)
            for i in range(taken):
                stats.new_tokens += 1
                if self.keep_logits:
                    self.logits.append(kept[:, i])
                yield out[:, i]


def generate(model, input_ids, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, attention: str | None = None, *,
             attention_mask=None, max_length: int | None = None, pad_token_id: int = 0,
             decode_implementation: str = "auto", interpret: bool = False,
             return_logits: bool = False, prefill_chunk: int | None = None,
             decode_chunk: int = 32,
             eos_token_ids=()):
    """Generate with a cache: token ids [B, L + max_new_tokens] (numpy int32, prompt included).

    Args:
      model: a `LlamaForCausalLM`.
      input_ids: [B, L] integer prompt ids (at least one token per row), each in
        [0, vocab_size) where attention_mask is 1 (a ValueError names any other).
      max_new_tokens: tokens to generate per sequence (>= 0).
      temperature: 0 for greedy decoding, otherwise sampling from softmax(logits / T).
      top_p: nucleus sampling: keep the most likely tokens up to this total probability.
      seed: random seed of the sampling (token i uses fold_in(PRNGKey(seed), i)).
      attention: "cca" (compressed cache), "full" (ordinary cache), or None for the model's
        configured attention. g and w come from the model config, and so do a hybrid
        model's full-attention layers (`LlamaConfig.full_attention_layers`: full caches in
        those layers, CCA caches in the rest, unless attention="full").
      attention_mask: [B, L] of 1 (token) / 0 (padding), left or right padded; each row's
        positions start at 0 at its first token. Rows keep their padding side in the
        output: left-padded rows end with their new tokens, right-padded rows continue right
        after their prompt and end with `pad_token_id`.
      max_length: cache capacity in tokens per sequence (default: just enough).
      decode_implementation: "auto" (Pallas split-K kernel on a GPU, jnp elsewhere), "jnp",
        "pallas"; interpret: run the Pallas kernel in interpret mode (CPU tests).
      return_logits: also return the float32 logits [B, max_new_tokens, vocab] that chose
        each new token (zeros after the run stopped early).
      prefill_chunk: prompt columns per prefill chunk (peak activation memory follows it);
        None: `auto_prefill_chunk`.
      decode_chunk: decode steps per device call.
      eos_token_ids: a row that produces one of these ids is done: its later tokens are
        pad_token_id; generation stops when every row is done (none: never).
    """
    session = CachedGeneration(model, input_ids, max_new_tokens, temperature=temperature,
                               top_p=top_p, seed=seed, attention=attention,
                               attention_mask=attention_mask, max_length=max_length,
                               decode_implementation=decode_implementation, interpret=interpret,
                               prefill_chunk=prefill_chunk, decode_chunk=decode_chunk,
                               eos_token_ids=eos_token_ids, pad_token_id=pad_token_id)
    session.keep_logits = return_logits
    new_tokens = [tokens for tokens in session]
    B = session.spec.batch_size
    vocab = model.config.vocab_size
    while len(new_tokens) < session.max_new_tokens:      # every row ended early
        new_tokens.append(np.full((B,), pad_token_id, np.int32))
        if return_logits:
            session.logits.append(np.zeros((B, vocab), np.float32))
    ids = np.asarray(input_ids).astype(np.int32)
    B, L = ids.shape
    N = session.max_new_tokens
    out = np.full((B, L + N), pad_token_id, np.int32)
    ends = session.starts + session.lengths               # column after each prompt
    columns = np.arange(L)[None, :]
    out[:, :L] = np.where(columns < ends[:, None], ids, pad_token_id)
    if N:
        new = np.stack(new_tokens, axis=1)                # [B, N]
        rows = np.arange(B)[:, None]
        out[rows, ends[:, None] + np.arange(N)[None, :]] = new
    if return_logits:
        logits = (np.stack(session.logits, axis=1) if N else np.zeros((B, 0, vocab), np.float32))
        return out, logits
    return out


def greedy_generate_uncached(model, input_ids, max_new_tokens: int, *,
                             prompt_lengths=None) -> np.ndarray:
    """Greedy continuation without a cache: one full forward pass per new token.

    input_ids [B, L]. Returns int32 ids [B, L + max_new_tokens]: row b holds its prompt (the
    first `prompt_lengths[b]` tokens of `input_ids[b]`, default all L), then its new tokens,
    then zeros. Prompts of different lengths go in right-padded; since attention is causal,
    the padding after a row's last token never changes that row's tokens.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must have shape [batch, length >= 1], got {input_ids.shape}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    B, L = input_ids.shape
    lengths = np.full(B, L) if prompt_lengths is None else np.asarray(prompt_lengths)
    if lengths.shape != (B,) or not np.issubdtype(lengths.dtype, np.integer) or \
            lengths.min() < 1 or lengths.max() > L:
        raise ValueError(f"prompt_lengths must be {B} ints in [1, {L}], got {prompt_lengths!r}")
    graphdef, state = nnx.split(model)

    @jax.jit
    def next_token(state, tokens, index):
        logits = nnx.merge(graphdef, state)(tokens)
        last = jnp.take_along_axis(logits, (index - 1)[:, None, None], axis=1)[:, 0]
        return jnp.argmax(last, axis=-1).astype(jnp.int32)

    columns = np.arange(L + max_new_tokens)
    tokens = np.where(columns[None, :L] < lengths[:, None], input_ids, 0)
    check_token_ids(tokens, model.config.vocab_size)   # jitted below: no check inside
    tokens = jnp.asarray(np.pad(tokens, ((0, 0), (0, max_new_tokens))), jnp.int32)
    rows = jnp.arange(B)
    for step in range(max_new_tokens):
        index = jnp.asarray(lengths + step, jnp.int32)
        tokens = tokens.at[rows, index].set(next_token(state, tokens, index))
    return np.asarray(tokens)


class _CallableModule(types.ModuleType):
    """`cca_jax.generate(...)` is `cca_jax.generate.generate(...)`."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
