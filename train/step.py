"""Optimizer, chunked float32 loss, and the jitted train / eval steps (functional, sharded).

- `make_optimizer`: optax AdamW after global-norm clipping, learning rate warmed up linearly
  over `warmup_steps` updates (update `s`, 0-based, uses `lr * min(1, (s + 1) / warmup)`),
  then constant. Paper defaults: lr 2e-5, 20 warm-up steps, clip 2.0, weight decay 0.
- the loss is `train.loss.token_nll`: summed next-token cross-entropy in float32, the
  vocabulary projection chunk by chunk (never the logits of the whole sequence at once).
- `make_train_step`: gradient accumulation over micro-batches (`lax.scan`), float32
  gradients of the float32 master weights (the model computes in its `dtype`, e.g. bf16),
  one optimizer update; returns loss, gradient norm. A step whose loss or gradient norm is
  not finite leaves the parameters and optimizer state as they were.
- Both steps are `jax.jit` with explicit in/out shardings; the train step donates the
  parameters and optimizer state.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from cca_jax.params import int_keys
from train.loss import token_nll


def learning_rate_schedule(lr: float, warmup_steps: int) -> Callable:
    if warmup_steps <= 0:
        return optax.constant_schedule(lr)

    def schedule(count):
        return lr * jnp.minimum(1.0, (count + 1) / warmup_steps)
    return schedule


def make_optimizer(lr: float, warmup_steps: int, clip: float, weight_decay: float):
    schedule = learning_rate_schedule(lr, warmup_steps)
    parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    parts.append(optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay))
    return optax.chain(*parts), schedule


class ModelFactory:
    """Rebuilds the nnx model from a (string-keyed) parameter tree inside traced code."""

    def __init__(self, abstract_model):
        self.graphdef, self.abstract_state = nnx.split(abstract_model, nnx.Param)

    def __call__(self, params: Mapping):
        state = jax.tree.map(lambda x: x, self.abstract_state)
        nnx.replace_by_pure_dict(state, int_keys(params))
        return nnx.merge(self.graphdef, state)


def make_train_step(factory: ModelFactory, tx, *, chunk: int, param_shardings,
                    opt_shardings, batch_sharding, mesh):
    """jit(params, opt_state, batch [accum, micro, L+1]) -> (params, opt_state, metrics)."""
    def loss_fn(params, tokens):
        total, count = token_nll(factory(params), tokens, chunk)
        return total, count

    def step(params, opt_state, batch):
        def micro(carry, tokens):
            grads_sum, loss_sum = carry
            (total, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens)
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
            return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + total), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (grads, total), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32)), batch)
        count = batch.shape[0] * batch.shape[1] * (batch.shape[2] - 1)
        grads = jax.tree.map(lambda g: g / count, grads)
        grad_norm = optax.global_norm(grads)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # A non-finite loss or gradient would poison every weight: such a step changes
        # nothing (the caller stops, or skips it within --nan-patience).
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)

        def if_finite(new, old):
            return jnp.where(finite, new, old)
        params = jax.tree.map(if_finite, new_params, params)
        opt_state = jax.tree.map(if_finite, new_opt_state, opt_state)
        return params, opt_state, {"loss": total / count, "grad_norm": grad_norm}

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step, in_shardings=(param_shardings, opt_shardings, batch_sharding),
                   out_shardings=(param_shardings, opt_shardings,
                                  {"loss": replicated, "grad_norm": replicated}),
                   donate_argnums=(0, 1))


def make_eval_step(factory: ModelFactory, *, chunk: int, param_shardings, batch_sharding,
                   mesh):
    """jit(params, batch [B, L+1]) -> summed float32 negative log-likelihood."""
    def step(params, tokens):
        total, _ = token_nll(factory(params), tokens, chunk)
        return total

    return jax.jit(step, in_shardings=(param_shardings, batch_sharding),
                   out_shardings=NamedSharding(mesh, PartitionSpec()))
