"""Token generation. For now: greedy decoding that recomputes the whole sequence each step.

`greedy_generate_uncached` is jitted once for the final length (positions after the current
one are padding that causal and CCA attention never look at), so it costs one full forward
pass per new token. It is the exactness oracle for cached decoding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def greedy_generate_uncached(model, input_ids, max_new_tokens: int) -> np.ndarray:
    """Greedy continuation: returns int32 ids [B, L + max_new_tokens] (prompt included)."""
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must have shape [batch, length >= 1], got {input_ids.shape}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    B, L = input_ids.shape
    graphdef, state = nnx.split(model)

    @jax.jit
    def next_token(state, tokens, index):
        logits = nnx.merge(graphdef, state)(tokens)
        last = jax.lax.dynamic_index_in_dim(logits, index - 1, axis=1, keepdims=False)
        return jnp.argmax(last, axis=-1).astype(jnp.int32)

    tokens = jnp.zeros((B, L + max_new_tokens), jnp.int32).at[:, :L].set(input_ids)
    for index in range(L, L + max_new_tokens):
        tokens = tokens.at[:, index].set(next_token(state, tokens, index))
    return np.asarray(tokens)
