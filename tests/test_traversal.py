"""Algorithm 1's joint order of (mask, batch) pairs (omgd_jax.traversal)."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import omgd_jax


def test_every_pair_once_and_a_fresh_order_every_cycle():
    m0, b0 = omgd_jax.joint_traversal(3, num_masks=3, num_batches=5, cycle=0)
    assert sorted(zip(m0.tolist(), b0.tolist(), strict=True)) == [
        (j, i) for j in range(3) for i in range(5)
    ]
    m1, b1 = omgd_jax.joint_traversal(3, num_masks=3, num_batches=5, cycle=1)
    assert (m0.tolist(), b0.tolist()) != (m1.tolist(), b1.tolist())


def test_algorithm_1_loop_covers_every_coordinate_per_sample():
    num_masks, num_batches = 2, 3
    params = {"w": jnp.zeros(6)}
    tx = optax.chain(omgd_jax.omgd_mask(num_masks, num_batches, key=0), optax.sgd(-1.0))
    state = tx.init(params)
    per_batch = np.zeros((num_batches, 6))
    masks, batches = omgd_jax.joint_traversal(1, num_masks, num_batches, cycle=0)
    for j, i in zip(masks.tolist(), batches.tolist(), strict=True):
        u, state = tx.update({"w": jnp.ones(6)}, state, params, mask_index=j)
        per_batch[i] += np.asarray(u["w"])
    np.testing.assert_array_equal(per_batch, num_masks)  # each batch saw every coordinate


@pytest.mark.parametrize(
    "kwargs", [dict(num_masks=0, num_batches=2), dict(num_masks=2, num_batches=1.5)]
)
def test_bad_sizes(kwargs):
    with pytest.raises(ValueError, match="must be an int >= 1"):
        omgd_jax.joint_traversal(0, cycle=0, **kwargs)
