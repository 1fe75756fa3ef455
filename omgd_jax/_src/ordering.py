"""The data dependences that order XLA's schedule where its own order would raise the peak.

XLA:CPU drops optimization barriers before it schedules, so an order that memory needs is
forced by a data dependence XLA cannot simplify away: a value computed from another one that
equals its input (a NaN test of one element folded into a clamp or a multiply by zero). Each
trick costs one scalar read; each has a test in ``tests/test_ordering.py`` that fails without it,
on a model sized so that its effect reaches the compiled peak.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _any_nan(tree) -> jax.Array:
    """bool scalar: is the first element of any float leaf of ``tree`` NaN (one read a leaf)."""
    nan = jnp.zeros((), bool)
    for leaf in jax.tree.leaves(tree):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            nan = nan | jnp.isnan(leaf[(0,) * leaf.ndim])
    return nan


def ids_after(ids: jax.Array, tree) -> jax.Array:
    """``ids`` (int, non-negative), made to depend on every float leaf of ``tree``.

    Why: in the lean step the gathered copy of the active layers (the optimizer's view of the
    parameters) is read by nothing before the optimizer, but XLA gathers it as early as it can,
    so it lived through the whole backward pass, one layer's weights on the peak. Gathering with
    ``ids_after(ids, grads)`` schedules it after the backward. The lean backward slices each
    active layer with its index made after that layer's incoming cotangent, so its
    recomputation runs then (outside the backward's loops XLA would run it as soon as the
    forward saved the layer's input). The clamp bound is ``max(ids)`` or more, so the value is
    ``ids``.
    """
    return jnp.minimum(ids, jnp.max(ids) + _any_nan(tree).astype(ids.dtype))


def zeros_after(like: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """Zeros of ``shape`` and ``dtype``, made from ``like`` (one element read).

    Why: a constant buffer (``jnp.zeros``) is allocated before the forward pass and lives
    through it; zeros made from the backward's incoming cotangent are made when the backward
    starts. The lean backward's ``[gamma, ...]`` gradient buffer is made this way.
    """
    zero = jnp.isnan(like[(0,) * like.ndim]).astype(dtype) * 0
    return jnp.broadcast_to(zero, shape)


def after(tree, like):
    """``tree`` unchanged, computed only once ``like`` exists (one element of ``like`` read;
    every float leaf of ``tree`` becomes ``x - 0``, a new buffer: exact for every value, the
    sign of zero included, NaN in ``like`` or not).

    Why: a recomputation in a backward pass (an attention's forward recomputed from its input)
    is otherwise identical to the forward's, and XLA merges the two, so the recomputed values
    live from the forward through every backward step before theirs. Recomputed from
    ``after(x, cotangent)``, it is a different value that can only run once that cotangent
    exists. ``examples/llama/model.py``'s ``attn_remat`` recomputes the attention this way
    (its kernels too: sliced again from the stack for the attention's backward). The lean
    backward hands the active layers' gradients on as ``after(grads, last cotangent)``: with
    one active layer XLA would otherwise hand that layer's own gradient to the update, which
    could then write the stack while the backward below still reads it, and XLA copies the
    whole stack.
    """
    nan = _any_nan(like)
    return jax.tree.map(
        lambda x: x - nan.astype(x.dtype) * 0 if jnp.issubdtype(x.dtype, jnp.floating) else x,
        tree,
    )


def materialise(tree, pred: jax.Array):
    """``tree`` unchanged, computed before anything that consumes it.

    Why: XLA:CPU would otherwise fuse the compact view's update into the full-size write of the
    update, where its reads of the parameters' window keep buffers alive that the in-place
    parameter update could reuse. The operands of a conditional are materialised; the identity
    branches cost one pass over the view.
    """
    return jax.lax.cond(pred, lambda t: t, lambda t: jax.tree.map(lambda x: x + 0, t), tree)
