"""A user's own NNX decoder, written outside the package, with CCAAttention as its attention
layer: it builds, runs under jit, and trains (the loss falls within a few steps)."""
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from cca_jax import CCAAttention


class Block(nnx.Module):
    def __init__(self, width, rngs):
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.attn = CCAAttention(width, num_heads=4, num_kv_heads=2, attention="cca",
                                 group_size=4, window_size=8, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 2 * width, rngs=rngs)
        self.down = nnx.Linear(2 * width, width, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class TinyDecoder(nnx.Module):
    def __init__(self, vocab, width, depth, rngs):
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.blocks = nnx.List([Block(width, rngs) for _ in range(depth)])
        self.head = nnx.Linear(width, vocab, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_user_decoder_with_cca_attention_trains():
    vocab, length = 32, 48
    model = TinyDecoder(vocab, 32, 2, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    # A periodic sequence: predictable once attention looks back a period.
    tokens = (jnp.arange(length + 1)[None, :] * 7 + jnp.arange(4)[:, None] * 3) % vocab

    def loss_fn(model):
        logits = model(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(15)]
    assert all(jnp.isfinite(jnp.asarray(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


def test_layer_rejects_bad_configuration():
    with pytest.raises(ValueError, match="num_kv_heads"):
        CCAAttention(32, num_heads=4, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attention"):
        CCAAttention(32, num_heads=4, attention="sparse", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="group_size"):
        CCAAttention(32, num_heads=4, group_size=0, rngs=nnx.Rngs(0))
