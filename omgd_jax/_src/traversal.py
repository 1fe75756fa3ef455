"""Algorithm 1's joint traversal of (mask, batch) pairs, for data loaders that drive it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from omgd_jax._src.schedule import canonical_key


def joint_traversal(
    key: jax.Array | int, num_masks: int, num_batches: int, cycle: int | jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One cycle of Algorithm 1: all M x N (mask, batch) pairs, each once, in a random order.

    Feed step t of the cycle with batch ``batch_index[t]`` and call the transform with
    ``update(..., mask_index=mask_index[t])``. Build the transform with
    ``steps_per_mask=num_batches`` so that its cycle (M * N steps) is this one: the masks of
    cycle k are then drawn once, at its start, as the algorithm asks.

    Args:
      key: PRNG key or int seed of the order (any key; not the transform's).
      num_masks: M.
      num_batches: N, batches (or samples) per epoch.
      cycle: index of the cycle; every cycle gets a fresh permutation.

    Returns:
      ``(mask_index, batch_index)``, two int32 arrays of length M * N.

    Examples:
      >>> import omgd_jax
      >>> masks, batches = omgd_jax.joint_traversal(0, num_masks=2, num_batches=3, cycle=0)
      >>> sorted(zip(masks.tolist(), batches.tolist()))
      [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    """
    for name, value in (("num_masks", num_masks), ("num_batches", num_batches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    pairs = jax.random.permutation(
        jax.random.fold_in(canonical_key(key), cycle), num_masks * num_batches
    )
    return (pairs // num_batches).astype(jnp.int32), (pairs % num_batches).astype(jnp.int32)
