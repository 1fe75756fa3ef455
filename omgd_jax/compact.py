"""Compact views of the active share: fixed-size buffers that the inner optimizer runs on.

A view keeps the treedef of the parameters, with `optax.MaskedNode` where a leaf takes no part,
so per-leaf callables of the inner optimizer (weight-decay masks, path filters) still apply.

* element granularity: every leaf contributes one window, band ``label`` of its flattened
  coordinates seen as an (M, c) array, c = ceil(n / M). The window keeps the leaf's rank,
  shape (c, 1, ..., 1), so rank-based masks see the same rank.
* layer granularity: stacked leaves contribute their gamma active layers, shape
  (gamma, *rest); unrolled layers put slot s at the leaves of layer s (all layers must share one
  structure). The always-active leaves form a second, *dense* view.

Reading gathers a view from a full tree; writing scatters a view back into a full-size tree of
zeros (an update, so inactive coordinates do not move).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from omgd_jax import layers as layers_lib

MASKED = optax.MaskedNode()


def window_shape(shape: tuple[int, ...], num_masks: int) -> tuple[int, ...]:
    """Shape of a leaf's element window: ceil(n / M) coordinates, the leaf's rank kept."""
    if not shape:
        return ()
    c = math.ceil(math.prod(shape) / num_masks)
    return (c,) + (1,) * (len(shape) - 1)


def read_window(leaf: jax.Array, label: jax.Array, num_masks: int) -> jax.Array:
    """Band ``label`` of ``leaf.ravel()``: row ``label`` of its (M, c) view, zero-padded.

    The padding (M c - n entries of the last band) reads as zero gradient and zero parameter,
    so the inner optimizer's update there is zero, and `write_window` drops it anyway.
    """
    shape = window_shape(leaf.shape, num_masks)
    c, n = math.prod(shape), leaf.size
    flat = leaf.reshape(-1)
    if num_masks * c != n:
        flat = jnp.pad(flat, (0, num_masks * c - n))
    return jax.lax.dynamic_index_in_dim(flat.reshape(num_masks, c), label, 0, False).reshape(shape)


def write_window(window: jax.Array, leaf_shape, label: jax.Array, num_masks: int) -> jax.Array:
    """A full-size update holding ``window`` in band ``label`` and zeros elsewhere.

    Written as a broadcast-select on the (M, c) view, not a `dynamic_update_slice` into zeros:
    XLA:CPU fuses the latter into its consumers and evaluates it element by element, 10-35x
    slower (GPT-2's token embedding: 850 ms against 23 ms).
    """
    n, c = math.prod(leaf_shape), window.size
    rows = jnp.arange(num_masks).reshape(num_masks, 1) == label
    flat = jnp.where(rows, window.reshape(1, c), jnp.zeros((), window.dtype)).reshape(-1)
    return flat[:n].reshape(leaf_shape)


def unrolled_positions(plan: layers_lib.Plan, leaves) -> list[list[int]]:
    """Leaf indices of every unrolled layer, checked to share one structure."""
    positions = [[] for _ in range(plan.num_layers)]
    for i, lid in enumerate(plan.layer_of):
        if plan.roles[i] == layers_lib.UNROLLED:
            positions[lid].append(i)
    signature = [(leaves[i].shape, leaves[i].dtype) for i in positions[0]]
    for lid, pos in enumerate(positions):
        if [(leaves[i].shape, leaves[i].dtype) for i in pos] != signature:
            raise ValueError(
                f"state='compact' with unrolled layers needs every layer to have the same leaves "
                f"(shapes and dtypes); layer {lid} differs from layer 0. Stack the layers "
                "(nnx.scan / nnx.vmap) or use state='frozen'"
            )
    return positions


def read_layers(plan: layers_lib.Plan, leaves, ids: jax.Array) -> list:
    """The view of the active layers ``ids`` (int32[gamma]); MaskedNode elsewhere."""
    out = [MASKED] * len(leaves)
    gamma = ids.shape[0]
    for i, role in enumerate(plan.roles):
        if role == layers_lib.STACKED:
            out[i] = jnp.stack(
                [jax.lax.dynamic_index_in_dim(leaves[i], ids[s], 0, False) for s in range(gamma)]
            )
    if layers_lib.UNROLLED in plan.roles:
        positions = unrolled_positions(plan, leaves)
        for s in range(gamma):
            branches = [lambda pos=pos: tuple(leaves[i] for i in pos) for pos in positions]
            for i, value in zip(positions[s], jax.lax.switch(ids[s], branches), strict=True):
                out[i] = value
    return out


def write_layers(plan: layers_lib.Plan, view: list, leaves, ids: jax.Array) -> list:
    """Scatters a layer view back: full-size zeros with the active layers filled in."""
    out = [None] * len(leaves)
    gamma = ids.shape[0]
    for i, role in enumerate(plan.roles):
        if role == layers_lib.STACKED:
            # A broadcast-select per active layer (see `write_window` for why not a DUS).
            layer = jnp.arange(leaves[i].shape[0]).reshape((-1,) + (1,) * (leaves[i].ndim - 1))
            full = jnp.zeros((), view[i].dtype)
            for s in range(gamma):
                full = jnp.where(layer == ids[s], view[i][s][None], full)
            out[i] = full
    if layers_lib.UNROLLED in plan.roles:
        positions = unrolled_positions(plan, leaves)
        slots = [tuple(view[i] for i in positions[s]) for s in range(gamma)]
        zeros = tuple(jnp.zeros_like(v) for v in slots[0])
        branches = [lambda: zeros] + [lambda v=v: v for v in slots]
        for lid, pos in enumerate(positions):
            slot = jnp.sum(jnp.where(ids == lid, jnp.arange(1, gamma + 1), 0))  # 0: inactive
            for i, value in zip(pos, jax.lax.switch(slot, branches), strict=True):
                out[i] = value
    return out
