"""Shared by the Pallas kernel tests: tile sizes, the kernel composed with core pooling, and the
dense definition with the core tokens given."""
import jax
import jax.numpy as jnp

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


def dense_given_core(q, k, v, core_k, core_v, g, w, scale):
    """docs/cca.md §3 with the core tokens given (any C >= c(L - 1)), dense, float32."""
    hi = jax.lax.Precision.HIGHEST
    L, H = q.shape[1], q.shape[2]
    r = H // k.shape[2]
    C = core_k.shape[1]
    k_rep, v_rep = jnp.repeat(k, r, axis=2), jnp.repeat(v, r, axis=2)
    m = jnp.arange(L)
    c = visible_core_count(m, g, w)
    cmask = jnp.arange(C)[None, :] < c[:, None]
    rmask = (m[None, :] >= c[:, None] * g) & (m[None, :] <= m[:, None])
    cs = jnp.einsum("bmhd,bjhd->bhmj", q, core_k, precision=hi) * scale
    rs = jnp.einsum("bmhd,bnhd->bhmn", q, k_rep, precision=hi) * scale
    p = jax.nn.softmax(jnp.concatenate([jnp.where(cmask, cs, -jnp.inf),
                                        jnp.where(rmask, rs, -jnp.inf)], -1), -1)
    return (jnp.einsum("bhmj,bjhd->bmhd", p[..., :C], core_v, precision=hi)
            + jnp.einsum("bhmn,bnhd->bmhd", p[..., C:], v_rep, precision=hi))
