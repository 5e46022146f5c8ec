"""cca-jax: Core Context Aware attention (Chen et al., ICML 2025) for JAX and Flax NNX."""
from cca_jax.attention import causal_attention, cca_attention
from cca_jax.layer import CCAAttention
from cca_jax.llama import LlamaConfig, LlamaForCausalLM
from cca_jax.loading import from_pretrained

__all__ = ["CCAAttention", "cca_attention", "causal_attention", "LlamaConfig",
           "LlamaForCausalLM", "from_pretrained", "generate"]


def __getattr__(name):
    # `cca_jax.generate(model, input_ids, ...)`: the module cca_jax.generate is callable (it
    # calls its `generate` function). Imported lazily so that `python -m cca_jax.generate`
    # does not find its own module already imported by the package.
    if name == "generate":
        import importlib
        return importlib.import_module("cca_jax.generate")
    raise AttributeError(f"module 'cca_jax' has no attribute {name!r}")
