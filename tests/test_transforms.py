"""`omgd_mask`: the masked gradient on hand-checkable cases (omgd_jax.transforms)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import omgd_jax
from tests.conftest import masks_over


def active_sets(masks, name="w"):
    return [tuple(np.flatnonzero(np.asarray(m[name]).reshape(-1)).tolist()) for m in masks]


def test_contiguous_bands_of_a_leaf_that_m_does_not_divide():
    # n = 7, M = 3: c = ceil(7 / 3) = 3, bands [0, 3), [3, 6) and the short [6, 7).
    masks = masks_over(omgd_jax.omgd_mask(3, 2, key=0), {"w": jnp.ones(7)}, 12)
    sets = active_sets(masks)
    assert sets[0::2] == sets[1::2]  # every mask held for K = 2 steps
    for cycle in (sets[0:6:2], sets[6:12:2]):
        assert sorted(cycle) == [(0, 1, 2), (3, 4, 5), (6,)]
    for m in masks:
        assert set(np.unique(np.asarray(m["w"])).tolist()) == {0.0, 3.0}


def test_bands_of_a_matrix_are_whole_rows_when_they_can_be():
    # (4, 3), M = 2: c = 6 = two rows.
    masks = masks_over(omgd_jax.omgd_mask(2, 1, key=1), {"w": jnp.ones((4, 3))}, 2)
    rows = sorted(tuple(np.flatnonzero(np.asarray(m["w"])[:, 0]).tolist()) for m in masks)
    assert rows == [(0, 1), (2, 3)]
    for m in masks:
        w = np.asarray(m["w"])
        assert np.all(w == w[:, :1])  # a row is all in or all out


def test_mask_then_sgd_is_minus_lr_times_m_times_the_gradient_on_the_band():
    tx = optax.chain(omgd_jax.omgd_mask(2, 1, key=3), optax.sgd(0.5))
    params = {"w": jnp.zeros(4)}
    g = {"w": jnp.array([1.0, 2.0, 3.0, 4.0])}
    state = tx.init(params)
    seen = []
    for _ in range(2):
        u, state = tx.update(g, state, params)
        seen.append(np.asarray(u["w"]).tolist())
    # -0.5 * 2 * g on one half, 0 on the other; both halves once per cycle.
    assert sorted(seen) == [[-1.0, -2.0, 0.0, 0.0], [0.0, 0.0, -3.0, -4.0]]


def test_without_scale_the_kept_entries_are_the_gradient():
    masks = masks_over(omgd_jax.omgd_mask(4, 1, scale=False), {"w": jnp.ones(8)}, 4)
    for m in masks:
        assert sorted(np.asarray(m["w"]).tolist()) == [0.0] * 6 + [1.0] * 2


def test_tensor_granularity_keeps_whole_leaves_half_at_a_time():
    tree = {f"p{i}": jnp.ones((i + 1,)) for i in range(4)}
    tx = omgd_jax.omgd_mask(2, 1, key=2, granularity="tensor")
    masks = masks_over(tx, tree, 4)
    for m in masks:
        kept = [k for k, v in m.items() if np.all(np.asarray(v) == 2.0)]
        dropped = [k for k, v in m.items() if np.all(np.asarray(v) == 0.0)]
        assert len(kept) == len(dropped) == 2  # count balance: 2 of 4 leaves, whole
    assert sorted(k for m in masks[:2] for k, v in m.items() if v[0] > 0) == sorted(tree)


def test_warmup_passes_the_gradient_unchanged():
    tx = omgd_jax.omgd_mask(2, 1, warmup_steps=2)
    params = {"w": jnp.zeros(4)}
    g = {"w": jnp.array([1.0, -2.0, 3.0, 0.5])}
    state = tx.init(params)
    for _ in range(2):
        u, state = tx.update(g, state, params)
        np.testing.assert_array_equal(u["w"], g["w"])
    u, state = tx.update(g, state, params)
    assert np.count_nonzero(np.asarray(u["w"])) == 2  # masking starts at step 2


def test_state_counts_steps_and_keeps_the_key():
    tx = omgd_jax.omgd_mask(2, 1, key=5)
    params = {"w": jnp.zeros(4)}
    state = tx.init(params)
    assert isinstance(state, omgd_jax.OmgdMaskState)
    assert state.omgd_step.dtype == jnp.int32 and int(state.omgd_step) == 0
    key = state.omgd_key
    for t in range(3):
        _, state = tx.update(params, state, params)
        assert int(state.omgd_step) == t + 1
    assert jax.random.key_data(state.omgd_key).tolist() == jax.random.key_data(key).tolist()


@pytest.mark.parametrize("key", [jax.random.key(7), jax.random.PRNGKey(7)])
def test_typed_and_raw_keys_give_the_masks_of_the_int_seed(key):
    tree = {"w": jnp.ones(12)}
    expected = masks_over(omgd_jax.omgd_mask(3, 1, key=7, layout="random"), tree, 6)
    got = masks_over(omgd_jax.omgd_mask(3, 1, key=key, layout="random"), tree, 6)
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(e["w"], g["w"])


def test_dtypes_are_kept_and_masked_out_leaves_pass_through():
    params = {"a": jnp.ones(4, jnp.bfloat16), "b": jnp.ones(3)}
    tx = optax.masked(omgd_jax.omgd_mask(2, 1), {"a": True, "b": False})
    g = {"a": jnp.full(4, 1.5, jnp.bfloat16), "b": jnp.full(3, 1.5)}
    u, _ = tx.update(g, tx.init(params), params)
    assert u["a"].dtype == jnp.bfloat16
    assert sorted(np.asarray(u["a"], np.float32).tolist()) == [0.0, 0.0, 3.0, 3.0]
    np.testing.assert_array_equal(u["b"], 1.5)  # not selected by optax.masked: untouched
