"""LLaMA-family decoder in Flax NNX whose attention is CCA or full causal attention.

`LlamaConfig` is a frozen (hashable) dataclass; `LlamaForCausalLM(config, rngs=...)` maps
`input_ids [B, L]` to float32 logits `[B, L, vocab]`. Layer and parameter names mirror
Hugging Face's `LlamaForCausalLM` (`model.layers.N.self_attn.q_proj` becomes
`layers[N].self_attn.q_proj.kernel`, stored `[in, out]`), so converting weights is a rename
plus a transpose. Qwen2-style q/k/v biases are supported through `attention_bias`.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `mlp`) as
metadata; `train/sharding.py` maps them to mesh axes. `LlamaConfig.remat` rematerialises each
decoder layer in the backward pass ("none", "full" or "dots", see `REMAT_POLICIES`).

Token ids must lie in [0, vocab_size). Concrete ids (numpy, or jax arrays outside jit) are
checked and a ValueError names the first bad id. Traced ids (inside `jax.jit` / `nnx.jit`)
cannot be checked: there an id >= vocab_size embeds as NaN (the embedding lookup fills
out-of-range rows with NaN), so the logits of its position and of every later position of
that sequence are NaN while earlier positions are unaffected, and a negative id counts from
the end of the vocabulary (-1 is the last token). Check ids before jitting, e.g. with
`check_token_ids`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cca_jax.config import (DEFAULT_CCA, CCAConfig, accepts_cca_keywords, check_attention_kind,
                            check_layer_indices, check_positive_int, layer_attention)
from cca_jax.layer import CCAAttention, constrain_sequence, partitioned
from cca_jax.rope import normalize_rope_scaling

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
# Per-decoder-layer rematerialisation: what a layer keeps for the backward pass.
#   none  keep everything (fastest, most memory)
#   full  keep only the layer input; recompute the whole layer in the backward pass
#   dots  keep the outputs of the weight matrix products (no batch dimensions), recompute
#         the rest (norms, activations, attention)
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_token_ids(input_ids, vocab_size: int, name: str = "input_ids") -> None:
    """ValueError naming `name`, the bad id and `vocab_size` if a concrete id lies outside
    [0, vocab_size). Traced ids (under jit) pass unchecked; see the module docstring."""
    if isinstance(input_ids, jax.core.Tracer):
        return
    ids = np.asarray(input_ids)
    if ids.size == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        position = tuple(int(i) for i in np.argwhere(ids == bad)[0])
        raise ValueError(f"{name} holds token id {bad} (at index {position}), outside the "
                         f"model's vocabulary: ids must be in [0, {vocab_size}) "
                         f"(vocab_size={vocab_size}); is the tokenizer the model's own?")


def _check_finite_number(name: str, value, *, minimum: float, inclusive: bool) -> None:
    bound = ">=" if inclusive else ">"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(
            value) or not (value >= minimum if inclusive else value > minimum):
        raise ValueError(f"{name} must be a finite number {bound} {minimum:g}, got {value!r}")


def _check_token_id_field(name: str, value) -> None:
    values = value if isinstance(value, tuple) else (value,)
    if value is None:
        return
    for item in values:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral) or item < 0:
            raise ValueError(f"{name} must be None, an int >= 0 or a list of them, "
                             f"got {value!r}")


def to_jnp_dtype(name: str, argument: str = "dtype"):
    if name not in DTYPES:
        raise ValueError(f"{argument} must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


@accepts_cca_keywords({"group_size": "group_size", "window_size": "window_size",
                       "attention_implementation": "implementation"})
@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture plus attention choice. Sizes default to a tiny test model.

    `cca` (a `CCAConfig`: g, w and the op implementation) is used when attention="cca";
    `group_size=`, `window_size=` and `attention_implementation=` are accepted as keywords
    (and by `replace`) and read back as properties.

    `full_attention_layers` makes a hybrid model: the decoder layers listed (indices from 0)
    use full causal attention, the others `attention`. Any iterable of ints is accepted and
    stored as a sorted tuple; an index out of range or listed twice is a ValueError. With
    attention="full" every layer is full whatever the list says (it is kept, so that
    `replace(attention="cca")` gives the hybrid back). `cca_jax.config.layer_attention(config,
    i)` says what layer i runs; `attention_kinds` lists all of them."""

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None  # normalised, hashable; see rope.normalize_rope_scaling
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False       # bias on q/k/v projections
    attention_out_bias: bool = False   # bias on o_proj (LLaMA's attention_bias sets both)
    mlp_bias: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple | None = None
    # How attention is computed (not part of the pretrained architecture):
    attention: str = "full"
    cca: CCAConfig = DEFAULT_CCA
    full_attention_layers: tuple = ()   # hybrid: these layers use full attention
    dtype: str = "float32"        # compute dtype
    param_dtype: str = "float32"  # storage dtype of the parameters
    remat: str = "none"           # per-layer rematerialisation policy, see REMAT_POLICIES

    def __post_init__(self):
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", normalize_rope_scaling(self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            check_positive_int(name, getattr(self, name))
        if self.head_dim is not None:
            check_positive_int("head_dim", self.head_dim)
        # RMSNorm divides by sqrt(mean(x^2) + eps): a negative eps makes NaN of small
        # activations; RoPE's frequencies are theta^(-2i/d).
        _check_finite_number("rms_norm_eps", self.rms_norm_eps, minimum=0, inclusive=True)
        _check_finite_number("rope_theta", self.rope_theta, minimum=0, inclusive=False)
        for name in ("tie_word_embeddings", "attention_bias", "attention_out_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _check_token_id_field("bos_token_id", self.bos_token_id)
        _check_token_id_field("eos_token_id", self.eos_token_id)
        if self.num_key_value_heads is not None:
            check_positive_int("num_key_value_heads", self.num_key_value_heads)
            if self.num_attention_heads % self.num_key_value_heads:
                raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a "
                                 f"multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        check_attention_kind(self.attention)
        if isinstance(self.cca, Mapping):    # from JSON
            object.__setattr__(self, "cca", CCAConfig(**self.cca))
        if not isinstance(self.cca, CCAConfig):
            raise TypeError(f"cca must be a CCAConfig, got {type(self.cca).__name__}")
        object.__setattr__(self, "full_attention_layers", check_layer_indices(
            self.full_attention_layers, self.num_hidden_layers))
        to_jnp_dtype(self.dtype, "dtype")
        to_jnp_dtype(self.param_dtype, "param_dtype")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}, "
                             f"got {self.remat!r}")

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def attention_kinds(self) -> tuple[str, ...]:
        """Each decoder layer's attention, "cca" or "full" (see `layer_attention`)."""
        return tuple(layer_attention(self, i) for i in range(self.num_hidden_layers))

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        out["full_attention_layers"] = list(self.full_attention_layers)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LlamaConfig":
        # Files written before `cca` existed hold group_size, window_size and
        # attention_implementation at the top level; the constructor takes them. Files
        # written before `full_attention_layers` existed have none: no layer is hybrid.
        known = {f.name for f in dataclasses.fields(cls)} | {
            "group_size", "window_size", "attention_implementation"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LlamaConfig fields: {', '.join(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


class RMSNorm(nnx.Module):
    """Root-mean-square norm computed in float32, as transformers does."""

    def __init__(self, size: int, eps: float, dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((size,), param_dtype), out_sharding=("embed",),
                                eager_sharding=False)
        self.eps, self.dtype = eps, dtype

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * xf.astype(self.dtype)


class LlamaMLP(nnx.Module):
    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        dtype, pdtype = DTYPES[config.dtype], DTYPES[config.param_dtype]

        def linear(n_in, n_out, axes):
            return nnx.Linear(n_in, n_out, use_bias=config.mlp_bias, dtype=dtype,
                              param_dtype=pdtype,
                              kernel_init=partitioned(nnx.initializers.lecun_normal(), axes),
                              bias_init=partitioned(nnx.initializers.zeros_init(), axes[1:]),
                              rngs=rngs)

        self.gate_proj = linear(config.hidden_size, config.intermediate_size, ("embed", "mlp"))
        self.up_proj = linear(config.hidden_size, config.intermediate_size, ("embed", "mlp"))
        self.down_proj = linear(config.intermediate_size, config.hidden_size, ("mlp", "embed"))

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    """Decoder layer `index` of a model of `config`: its attention is
    `layer_attention(config, index)`."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs, index: int = 0):
        dtype, pdtype = DTYPES[config.dtype], DTYPES[config.param_dtype]
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, pdtype)
        self.self_attn = CCAAttention(
            config.hidden_size, config.num_attention_heads, config.kv_heads, config.head_size,
            attention=layer_attention(config, index), cca=config.cca,
            rope_theta=config.rope_theta,
            rope_scaling=config.rope_scaling,
            max_position_embeddings=config.max_position_embeddings,
            qkv_bias=config.attention_bias, out_bias=config.attention_out_bias, dtype=dtype,
            param_dtype=pdtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype,
                                                pdtype)
        self.mlp = LlamaMLP(config, rngs)

    def __call__(self, x, positions=None, cache=None, step=None):
        """x [B, L, hidden] -> [B, L, hidden]; with a layer cache (and the call's
        `CacheStep`), -> (y, new layer cache): see `CCAAttention.__call__`."""
        if cache is None:
            x = x + self.self_attn(self.input_layernorm(x), positions)
            return x + self.mlp(self.post_attention_layernorm(x))
        attended, cache = self.self_attn(self.input_layernorm(x), positions, cache, step)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), cache


def _call_layer(layer, x, positions):
    return layer(x, positions)


class LlamaForCausalLM(nnx.Module):
    """`model(input_ids [B, L], positions=None)` -> float32 logits `[B, L, vocab_size]`.

    Cached call: `model(input_ids [B, T], cache=decode_cache, counts=None)` appends the T
    tokens of each row (only the first counts[b], default all T) to a
    `cca_jax.cache.DecodeCache` at positions `cache.lengths + 0 ..` and returns (float32
    logits [B, vocab_size] of each row's last appended token, the new cache). T = 1 is a
    decode step; a longer T is a prompt chunk. Same layers, same code as the plain call.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, pdtype = DTYPES[config.dtype], DTYPES[config.param_dtype]
        embed_init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                      param_dtype=pdtype,
                                      embedding_init=partitioned(embed_init, ("vocab", "embed")),
                                      rngs=rngs)
        # A Python list of layers, not a scanned stack: each layer is traced on its own, so
        # the layers of a hybrid model may differ in kind at no cost in the compiled code.
        self.layers = nnx.List([LlamaDecoderLayer(config, rngs, index)
                                for index in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, pdtype)
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Linear(
                config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                param_dtype=pdtype,
                kernel_init=partitioned(nnx.initializers.lecun_normal(), ("embed", "vocab")),
                rngs=rngs)

    def hidden_states(self, input_ids, positions=None):
        """Final normalised hidden states [B, L, hidden_size] (before the vocabulary head)."""
        if getattr(input_ids, "ndim", None) != 2 or not jnp.issubdtype(input_ids.dtype,
                                                                        jnp.integer):
            raise ValueError("input_ids must be an integer array of shape [batch, length], got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)} "
                             f"{getattr(input_ids, 'dtype', '')}")
        check_token_ids(input_ids, self.config.vocab_size)
        x = constrain_sequence(self.embed_tokens(input_ids))
        policy = self.config.remat
        for layer in self.layers:
            if policy == "none":
                x = layer(x, positions)
            else:
                x = nnx.remat(_call_layer, policy=REMAT_POLICIES[policy])(layer, x, positions)
        return self.norm(x)

    def logits(self, hidden):
        """float32 logits from hidden states (any leading shape)."""
        if self.config.tie_word_embeddings:
            out = self.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)

    def __call__(self, input_ids, positions=None, *, cache=None, counts=None,
                 cache_empty: bool = False, decode_implementation: str = "jnp",
                 interpret: bool = False):
        if cache is None:
            return self.logits(self.hidden_states(input_ids, positions))
        return self._cached_call(input_ids, positions, cache, counts, cache_empty,
                                 decode_implementation, interpret)

    def _cached_call(self, input_ids, positions, cache, counts, cache_empty,
                     decode_implementation, interpret):
        from cca_jax.cache import CacheStep, DecodeCache, check_model_matches

        if getattr(input_ids, "ndim", None) != 2 or not jnp.issubdtype(input_ids.dtype,
                                                                        jnp.integer):
            raise ValueError("input_ids must be an integer array of shape [batch, length], got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)} "
                             f"{getattr(input_ids, 'dtype', '')}")
        if positions is not None:
            raise ValueError("positions must be None in a cached call: they continue the "
                             "cache (cache.lengths)")
        if not isinstance(cache, DecodeCache):
            raise TypeError(f"cache must be a cca_jax.cache.DecodeCache, got "
                            f"{type(cache).__name__}")
        check_model_matches(self, cache.spec)
        B, T = input_ids.shape
        if B != cache.spec.batch_size:
            raise ValueError(f"input_ids has batch {B}, the cache {cache.spec.batch_size}")
        if decode_implementation not in ("jnp", "pallas"):
            raise ValueError(f"decode_implementation must be 'jnp' or 'pallas' (resolve 'auto' "
                             f"with cca_jax.cache.resolve_decode_implementation), got "
                             f"{decode_implementation!r}")
        check_token_ids(input_ids, self.config.vocab_size)
        all_real = counts is None
        counts = (jnp.full((B,), T, jnp.int32) if counts is None
                  else jnp.asarray(counts, jnp.int32))
        step = CacheStep(start=cache.lengths, count=counts, spec=cache.spec,
                         empty=bool(cache_empty), all_real=all_real,
                         decode_implementation=decode_implementation,
                         interpret=bool(interpret))
        x = self.embed_tokens(input_ids)
        layers = []
        for index, (layer, layer_cache) in enumerate(zip(self.layers, cache.layers)):
            # Each layer attends as its cache layer's kind says (cache.spec's pattern).
            x, layer_cache = layer(x, cache=layer_cache, step=step.for_layer(index))
            layers.append(layer_cache)
        last = jnp.take_along_axis(x, jnp.maximum(counts - 1, 0)[:, None, None], axis=1)[:, 0]
        logits = self.logits(self.norm(last))
        return logits, DecodeCache(layers=tuple(layers), lengths=cache.lengths + counts,
                                   spec=cache.spec)
