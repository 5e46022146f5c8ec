"""The token loss: next-token negative log-likelihood in float32, its vocabulary projection
chunk by chunk.

One helper serves fine-tuning (`token_nll`, the summed loss the train and eval steps
differentiate or report), the evaluation (`token_losses`: per-token loss and top-1
correctness) and the model benchmark. Each chunk's `[batch, chunk, vocab]` float32 logits
exist only inside a rematerialised `lax.map` step, so neither the forward nor the backward
pass ever holds the logits of the whole sequence.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def token_losses(model, hidden, targets, chunk: int):
    """(nll float32 [B, L], top-1 correct bool [B, L]) of `targets` [B, L] under the logits
    of `hidden` [B, L, D] (`model.hidden_states` output), formed `chunk` positions at a time:
    nll[b, i] = -log softmax(logits[b, i])[targets[b, i]]."""
    B, L, D = hidden.shape
    chunk = max(1, min(chunk, L))
    n = -(-L // chunk)
    pad = n * chunk - L
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk, D)
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, n, chunk)

    @jax.checkpoint
    def one_chunk(h, t):
        logits = model.logits(h)                              # float32 [B, chunk, vocab]
        return (optax.softmax_cross_entropy_with_integer_labels(logits, t),
                jnp.argmax(logits, axis=-1) == t)

    nll, top1 = jax.lax.map(lambda xs: one_chunk(*xs),
                            (hidden.swapaxes(0, 1), targets.swapaxes(0, 1)))

    def unchunk(x):
        return x.swapaxes(0, 1).reshape(B, n * chunk)[:, :L]
    return unchunk(nll), unchunk(top1)


def token_nll(model, tokens, chunk: int):
    """(sum of next-token negative log-likelihoods in float32, number of predicted tokens).

    tokens: int [B, L + 1]; positions 0..L-1 for every row.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    nll, _ = token_losses(model, model.hidden_states(inputs), targets, chunk)
    return nll.sum(), nll.size
