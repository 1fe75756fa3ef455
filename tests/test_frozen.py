"""`omgd(..., state="frozen")`: a state per unit, inactive units untouched (omgd_jax.frozen)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import omgd_jax
from tests.conftest import masks_over, random_tree, stacked_tree


def numpy_adamw_skipping_inactive(params, grads, active, lr, b1, b2, eps, wd):
    """PyTorch's AdamW on the units that have a gradient; the others are skipped entirely.

    ``active[t][name]`` is a boolean array broadcastable to the parameter (per layer for
    stacked leaves): the unit is skipped, its step count included, where it is False.
    """
    p = {k: np.array(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    steps = {k: np.zeros(np.shape(active[0][k])) for k in p}
    for g, act in zip(grads, active, strict=True):
        for k in p:
            a = np.broadcast_to(act[k], p[k].shape)
            steps[k] = steps[k] + act[k]
            n = np.broadcast_to(np.maximum(steps[k], 1), p[k].shape)
            m_new = b1 * m[k] + (1 - b1) * g[k]
            v_new = b2 * v[k] + (1 - b2) * g[k] ** 2
            step = (m_new / (1 - b1**n)) / (np.sqrt(v_new / (1 - b2**n)) + eps) + wd * p[k]
            p[k] = np.where(a, p[k] - lr * step, p[k])
            m[k] = np.where(a, m_new, m[k])
            v[k] = np.where(a, v_new, v[k])
    return p


@pytest.mark.parametrize(
    "kwargs",
    [dict(granularity="tensor"), dict(granularity="layer", layers=r"^blocks/", num_masks=2)],
)
def test_frozen_adamw_matches_pytorch_style_reference(kwargs):
    tree = stacked_tree(num_layers=4)
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): x
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    params = {k: 0.5 * x for k, x in random_tree(flat, 0).items()}
    kwargs = {"num_masks": 3, **kwargs}
    hyper = dict(learning_rate=0.05, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    tx = omgd_jax.omgd_adamw(
        **hyper, steps_per_mask=2, key=4, state="frozen", scale=False, **kwargs
    )
    mask_tx = omgd_jax.omgd_mask(steps_per_mask=2, key=4, scale=False, **kwargs)
    steps = 14
    grads = [random_tree(params, 100 + t) for t in range(steps)]
    masks = masks_over(mask_tx, params, steps)
    active = [
        {
            k: np.asarray(m[k][(slice(None),) + (0,) * (m[k].ndim - 1)] > 0).reshape(
                (-1,) + (1,) * (m[k].ndim - 1)
            )
            if k.startswith("blocks")
            else bool(np.all(np.asarray(m[k]) > 0))
            for k in m
        }
        for m in masks
    ]
    state, p = tx.init(params), params
    update = jax.jit(tx.update)
    for g in grads:
        u, state = update(g, state, p)
        p = optax.apply_updates(p, u)
    ref = numpy_adamw_skipping_inactive(
        params,
        [{k: np.asarray(x, np.float64) for k, x in g.items()} for g in grads],
        active,
        0.05,
        0.9,
        0.95,
        1e-8,
        0.1,
    )
    assert any(not np.all(a[k]) for a in active for k in a)  # something was frozen
    for k in params:
        np.testing.assert_allclose(p[k], ref[k], rtol=2e-5, atol=2e-6)


def test_frozen_leaves_untouched_while_inactive():
    params = {f"p{i}": jnp.full((3,), float(i)) for i in range(4)}
    tx = omgd_jax.omgd_adamw(
        0.1, weight_decay=0.5, num_masks=2, steps_per_mask=1, granularity="tensor", state="frozen"
    )
    state = tx.init(params)
    g = jax.tree.map(jnp.ones_like, params)
    u, state = tx.update(g, state, params)
    inactive = [k for k in params if float(jnp.abs(u[k]).sum()) == 0]
    assert len(inactive) == 2  # no step, no weight decay
    counts = optax.tree.get(state, "count")
    assert sorted(int(counts[k]) for k in params) == [0, 0, 1, 1]


def test_per_unit_step_counts_follow_the_layers_masks():
    tree = stacked_tree(num_layers=4)
    kwargs = dict(key=2, granularity="layer", layers=r"^blocks/", num_masks=2)
    tx = omgd_jax.omgd(optax.adam(1e-2), steps_per_mask=1, state="frozen", **kwargs)
    masks = masks_over(omgd_jax.omgd_mask(steps_per_mask=1, **kwargs), tree, 6)
    state = tx.init(tree)
    update = jax.jit(tx.update)
    for _ in range(6):
        _, state = update(tree, state, tree)
    counts = optax.tree.get(state, "count")
    active_steps = sum(np.asarray(m["blocks"]["ln"]["scale"][:, 0]) > 0 for m in masks)
    assert sorted(active_steps.tolist()) == [3, 3, 3, 3]  # wor: 2 of 4 layers per step
    for leaf in jax.tree.leaves(counts["blocks"]):  # one counter per layer of a stacked leaf
        np.testing.assert_array_equal(leaf, active_steps)
    assert int(counts["wte"]) == int(counts["ln_f"]) == 6  # always active


def test_per_leaf_counts_advance_while_any_entry_of_the_leaf_trains():
    # M = 3 contiguous bands: the 6-entry leaf has an active band every step, the 1-entry
    # leaf only when its single entry's band (band 0) is drawn, once per cycle.
    params = {"big": jnp.ones(6), "one": jnp.ones(1)}
    tx = omgd_jax.omgd(optax.adam(1e-2), 3, 1, key=1, state="frozen")
    state = tx.init(params)
    moved = []
    for _ in range(6):
        u, state = tx.update(params, state, params)
        moved.append(bool(u["one"][0] != 0))
    counts = optax.tree.get(state, "count")
    assert int(counts["big"]) == 6
    assert int(counts["one"]) == sum(moved) == 2


@pytest.mark.parametrize(
    "mask", [{"a": True, "b": False}, lambda params: jax.tree.map(lambda x: x.ndim == 2, params)]
)
def test_frozen_adamw_decays_the_leaves_its_mask_selects(mask):
    # With zero gradients Adam's step is 0, so the update is the decay alone: -lr * wd * theta.
    params = {"a": jnp.full((2, 2), 3.0), "b": jnp.full((2,), 5.0)}
    tx = omgd_jax.omgd_adamw(
        0.1, weight_decay=0.5, mask=mask, num_masks=1, granularity="tensor", state="frozen"
    )
    u, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(u["a"], -0.1 * 0.5 * 3.0)
    np.testing.assert_array_equal(u["b"], 0.0)


def test_an_inner_state_that_differs_between_leaves_is_an_error():
    inner = optax.masked(optax.adam(1e-3), lambda p: p.ndim == 2)
    tx = omgd_jax.omgd(inner, 2, state="frozen", granularity="tensor")
    with pytest.raises(ValueError, match="an optax.masked inside it breaks that"):
        tx.init({"a": jnp.ones((2, 2)), "b": jnp.ones(2)})


def test_map_params_sees_one_params_shaped_tree_per_moment():
    params = {"a": jnp.ones((4, 2)), "b": jnp.ones(3)}
    tx = omgd_jax.omgd(optax.adam(1e-3), 2, state="frozen")
    mapped = optax.tree.map_params(
        tx, lambda x: x.shape, tx.init(params), transform_non_params=lambda _: None
    )
    adam_state = mapped.omgd_inner_state[0]  # optax.adam: chain(scale_by_adam, scale)
    assert adam_state.mu == adam_state.nu == {"a": (4, 2), "b": (3,)}
