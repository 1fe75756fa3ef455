"""Token-embedding lookup whose gradient buffer is made when the backward pass reaches it.

The transpose of ``jnp.take`` scatter-adds the cotangent into a zeros table that depends on
nothing, so XLA may allocate it before the forward pass; the (vocab, d) buffer then lives
through the whole backward pass (0.24 GiB at LLaMA-7B, in every method's step). Here the zeros
are derived from the cotangent: they exist from when the backward pass reaches the embedding.
Values and gradients are those of ``nnx.Embed.__call__`` (the scatter-add summed in the
table's dtype).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def embed(module: nnx.Embed, idx: jax.Array) -> jax.Array:
    """``module(idx)``: rows ``idx`` of the table, in the module's compute dtype."""
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError(f"embed: idx must hold integer token ids, got dtype {idx.dtype}")
    out = _lookup(module.embedding[...], idx)
    return out if module.dtype is None else out.astype(module.dtype)


@jax.custom_vjp
def _lookup(table, idx):
    return jnp.take(table, idx, axis=0)


def _lookup_fwd(table, idx):
    return _lookup(table, idx), (idx, jax.ShapeDtypeStruct(table.shape, table.dtype))


def _lookup_bwd(res, dy):
    idx, table = res
    # 0 computed from dy: the zeros table cannot be scheduled before dy exists.
    zero = jnp.isnan(dy[(0,) * dy.ndim]).astype(table.dtype) * 0
    grad = jnp.broadcast_to(zero, table.shape).at[idx].add(dy.astype(table.dtype))
    return grad, None


_lookup.defvjp(_lookup_fwd, _lookup_bwd)
