"""cca-jax: Core Context Aware attention (Chen et al., ICML 2025) for JAX and Flax NNX."""
from cca_jax.attention import CCAAttention, causal_attention, cca_attention
from cca_jax.llama import LlamaConfig, LlamaForCausalLM
from cca_jax.loading import from_pretrained

__all__ = ["CCAAttention", "cca_attention", "causal_attention", "LlamaConfig",
           "LlamaForCausalLM", "from_pretrained"]
