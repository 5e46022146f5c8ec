"""Rotary position embedding in the Hugging Face `rotate_half` convention.

Converted PyTorch q/k weights need no permutation because we rotate the two halves of each
head (not interleaved pairs), exactly like transformers' LLaMA. Supports the rope types of
LLaMA configs: default, linear, llama3 and dynamic (NTK, computed from the static length).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


def normalize_rope_scaling(scaling: Mapping[str, Any] | None) -> tuple | None:
    """Turn an HF `rope_scaling` / `rope_parameters` dict into a hashable sorted tuple.

    Accepts the key `type` (transformers 4) or `rope_type`; drops `rope_theta`. Returns None
    for no scaling (rope type "default").
    """
    if scaling is None:
        return None
    if not isinstance(scaling, Mapping):
        raise TypeError(f"rope_scaling must be a dict or None, got {type(scaling).__name__}")
    params = {k: v for k, v in scaling.items() if k not in ("rope_theta", "type")}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported; "
                         f"supported: {', '.join(ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("rope_scaling: partial_rotary_factor other than 1 is not supported, "
                         f"got {params['partial_rotary_factor']}")
    params.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return None
    required = {"linear": ("factor",), "dynamic": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings")}[rope_type]
    missing = [key for key in required if key not in params]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} needs {', '.join(missing)}")
    params["rope_type"] = rope_type
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))


def parse_rope_scaling(text: str | None, argument: str = "rope_scaling"):
    """A command-line RoPE scaling: None (no text: keep the model's), "none" (remove the
    model's scaling), or a normalised rope_scaling tuple from 'TYPE:FACTOR' (e.g. 'linear:4',
    'dynamic:4') or a JSON dict such as '{"rope_type": "llama3", "factor": 8, ...}'.
    ValueError naming `argument` for anything else, or a factor or frequency that is not a
    finite positive number."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return "none"
    if text.strip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{argument}: invalid JSON ({err})") from None
    else:
        kind, _, factor = text.partition(":")
        try:
            data = {"rope_type": kind.strip(), "factor": float(factor)}
        except ValueError:
            raise ValueError(f"{argument} must be TYPE:FACTOR (e.g. linear:4), a JSON dict, "
                             f"or none; got {text!r}") from None
    try:
        scaling = normalize_rope_scaling(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{argument}: {err}") from None
    for key, value in scaling or ():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            positive = key.endswith("factor")
            if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
                raise ValueError(f"{argument} {key} must be a finite number "
                                 f"{'> 0' if positive else '>= 0'}, got {value}")
    return scaling


@dataclasses.dataclass(frozen=True)
class RotaryEmbedding:
    """Static description of a rotary embedding; `cos_sin` builds the tables."""

    head_dim: int
    theta: float = 10000.0
    scaling: tuple | None = None  # from normalize_rope_scaling
    max_position_embeddings: int = 2048

    def __post_init__(self):
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.theta <= 0:
            raise ValueError(f"rope_theta must be positive, got {self.theta}")

    def inverse_frequencies(self, seq_len: int | None = None) -> np.ndarray:
        """float32 inverse frequencies [head_dim // 2], after scaling."""
        dim = self.head_dim
        params = dict(self.scaling or ())
        rope_type = params.get("rope_type", "default")
        base = float(self.theta)
        if rope_type == "dynamic" and seq_len is not None and seq_len > self.max_position_embeddings:
            factor = params["factor"]
            base = base * ((factor * seq_len / self.max_position_embeddings) - (factor - 1)) ** (
                dim / (dim - 2))
        exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
        inv_freq = (1.0 / (np.float32(base) ** exponents)).astype(np.float32)
        if rope_type == "linear":
            inv_freq = inv_freq / np.float32(params["factor"])
        elif rope_type == "llama3":
            factor = params["factor"]
            low, high = params["low_freq_factor"], params["high_freq_factor"]
            old_len = params["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
            smooth = (old_len / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
            inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
        return inv_freq

    def cos_sin(self, positions, dtype, seq_len: int | None = None):
        """cos, sin tables [B, L, 1, head_dim] in `dtype` for integer positions [B, L]."""
        inv_freq = jnp.asarray(self.inverse_frequencies(seq_len))
        freqs = positions.astype(jnp.float32)[..., None] * inv_freq
        emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
        return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, cos, sin):
    """x: [B, L, heads, head_dim]; cos/sin: [B, L, 1, head_dim]."""
    return x * cos + rotate_half(x) * sin
