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
    nll[b, i] = -log softmax(logits[b, i])[targets[b, i]].

    Under context parallelism (the sequence split into c shards, `cca_jax.layer`) the chunks
    are taken within each shard, all shards at once, so no shard's hidden states move."""
    from cca_jax.layer import context_size

    B, L, D = hidden.shape
    shards = context_size(L)
    Ls = L // shards
    chunk = max(1, min(chunk, Ls))
    n = -(-Ls // chunk)
    pad = n * chunk - Ls
    hidden = jnp.pad(hidden.reshape(B, shards, Ls, D), ((0, 0), (0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets.reshape(B, shards, Ls), ((0, 0), (0, 0), (0, pad)))
    hidden = hidden.reshape(B, shards, n, chunk, D)
    targets = targets.reshape(B, shards, n, chunk)

    @jax.checkpoint
    def one_chunk(h, t):
        logits = model.logits(h)                        # float32 [B, shards, chunk, vocab]
        return (optax.softmax_cross_entropy_with_integer_labels(logits, t),
                jnp.argmax(logits, axis=-1) == t)

    nll, top1 = jax.lax.map(lambda xs: one_chunk(*xs),
                            (jnp.moveaxis(hidden, 2, 0), jnp.moveaxis(targets, 2, 0)))

    def unchunk(x):                                     # [n, B, shards, chunk] -> [B, L]
        x = jnp.moveaxis(x, 0, 2).reshape(B, shards, n * chunk)[:, :, :Ls]
        return x.reshape(B, L)
    return unchunk(nll), unchunk(top1)


def token_nll(model, tokens, chunk: int):
    """(sum of next-token negative log-likelihoods in float32, number of predicted tokens).

    tokens: int [B, L + 1]; positions 0..L-1 for every row (under context parallelism with
    the zigzag layout, `cca_jax.layer.sequence_layout`, laid out in zigzag order).
    """
    from cca_jax.layer import zigzag_positions

    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    positions = None
    order = zigzag_positions(inputs.shape[1])
    if order is not None:
        # Context parallelism, zigzag layout: tokens, targets and RoPE positions laid out
        # alike; the summed loss does not depend on the order.
        inputs, targets = jnp.take(inputs, order, axis=1), jnp.take(targets, order, axis=1)
        positions = jnp.broadcast_to(jnp.asarray(order, jnp.int32), inputs.shape)
    nll, _ = token_losses(model, model.hidden_states(inputs, positions), targets, chunk)
    return nll.sum(), nll.size
