"""Shared by the Pallas kernel tests: tile sizes and the kernel composed with core pooling."""
from cca_jax.reference import pool_core_tokens
from cca_kernels.cca_attention import BlockSizes, cca_attention_pallas
from cca_kernels.visibility import visible_core_count

SMALL = BlockSizes(16, 16, 16, 16, 16, 16)
MIXED = BlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32, block_q_dkv=32,
                   block_k_dkv=16)


def pallas_cca(g, w, scale, blocks=SMALL, **kwargs):
    """pool_core_tokens (jnp) + the Pallas kernel (interpret mode), a function of (q, k, v)."""
    def fn(q, k, v):
        L = q.shape[1]
        core_k, core_v = pool_core_tokens(q, k, v, group_size=g, scale=scale,
                                          num_groups=visible_core_count(L - 1, g, w))
        return cca_attention_pallas(q, k, v, core_k, core_v, group_size=g, window_size=w,
                                    scale=scale, interpret=True, block_sizes=blocks, **kwargs)
    return fn
