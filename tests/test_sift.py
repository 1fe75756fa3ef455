"""SIFT: the top-|g| subset, AdamW on it only, fixed-size state (omgd_jax.sift)."""

import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import omgd_jax
from tests.conftest import stacked_tree

SIFT_STATIC = ("sparse_rate", "select_step", "leaves", "stacked", "mask")


def random_tree(tree, seed):
    keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(tree)))
    leaves = [
        jax.random.normal(k, x.shape) for k, x in zip(keys, jax.tree.leaves(tree), strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def nbytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def top_k_rows(g, rows, k):
    """NumPy: per row of the (rows, -1) view, the set of the k largest |g|."""
    flat = np.abs(np.asarray(g)).reshape(rows, -1)
    return [set(np.argsort(-row, kind="stable")[:k].tolist()) for row in flat]


PARAMS = {"w": jnp.zeros((5, 8)), "blocks": jnp.zeros((3, 4, 5)), "b": jnp.zeros(7)}


def test_subset_is_the_top_abs_g_set_and_the_rest_stays_bit_for_bit():
    params = random_tree(PARAMS, 10)
    tx = omgd_jax.sift(0.05, sparse_rate=0.15, stacked="blocks", weight_decay=0.1)
    state, update = tx.init(params), jax.jit(tx.update)
    g0 = random_tree(params, 0)
    new = params
    for t in range(4):
        u, state = update(g0 if t == 0 else random_tree(params, t), state, new)
        new = optax.apply_updates(new, u)
    indices = optax.tree.get(state, "sift_indices")
    for name, rows in (("w", 1), ("blocks", 3), ("b", 1)):
        length = params[name].size // rows
        k = math.ceil(0.15 * length)
        chosen = [set(r.tolist()) for r in np.asarray(indices[name])]
        assert chosen == top_k_rows(g0[name], rows, k)
        before = np.asarray(params[name]).reshape(rows, length)
        after = np.asarray(new[name]).reshape(rows, length)
        for r in range(rows):
            off = np.setdiff1d(np.arange(length), list(chosen[r]))
            np.testing.assert_array_equal(
                after[r, off].view(np.uint32), before[r, off].view(np.uint32)
            )
            assert np.all(after[r, list(chosen[r])] != before[r, list(chosen[r])])


def test_subset_adamw_matches_numpy():
    params = random_tree({"w": jnp.zeros((4, 6))}, 3)
    lr, b1, b2, eps, wd, rate = 0.1, 0.8, 0.9, 1e-3, 0.05, 0.25
    tx = omgd_jax.sift(lr, rate, b1=b1, b2=b2, eps=eps, weight_decay=wd)
    grads = [random_tree(params, 20 + t)["w"] for t in range(4)]
    state, p = tx.init(params), params
    for g in grads:
        u, state = tx.update({"w": g}, state, p)
        p = optax.apply_updates(p, u)
    k = math.ceil(rate * 24)
    idx = np.argsort(-np.abs(np.asarray(grads[0])).ravel(), kind="stable")[:k]
    theta = np.asarray(params["w"], np.float64).ravel().copy()
    m = v = np.zeros(k)
    for t, g in enumerate(grads, start=1):
        gs = np.asarray(g, np.float64).ravel()[idx]
        m = b1 * m + (1 - b1) * gs
        v = b2 * v + (1 - b2) * gs**2
        step = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + wd * theta[idx]
        theta[idx] -= lr * step
    np.testing.assert_allclose(np.asarray(p["w"]).ravel(), theta, rtol=1e-5, atol=1e-6)


def test_state_holds_only_the_subset():
    params = {"w": jnp.zeros((64, 100)), "b": jnp.zeros(100)}
    state = omgd_jax.sift(1e-3, 0.1).init(params)
    k_w, k_b = 640, 10
    indices = optax.tree.get(state, "sift_indices")
    assert indices["w"].shape == (1, k_w) and indices["w"].dtype == jnp.int32
    mu = optax.tree.get(state, "mu")
    assert mu["w"].shape == (1, k_w) and mu["b"].shape == (1, k_b)
    counters = 4 + 4  # SIFT's count and Adam's
    assert nbytes(state) == 12 * (k_w + k_b) + counters  # int32 index + two fp32 moments
    adamw = optax.adamw(1e-3).init(params)
    assert nbytes(state) / nbytes(adamw) == pytest.approx(0.15, abs=1e-3)


def test_nothing_moves_before_select_step_and_the_selection_uses_that_step():
    params = random_tree({"w": jnp.zeros((3, 5))}, 1)
    tx = omgd_jax.sift(0.1, 0.2, select_step=2, weight_decay=0.1)
    state = tx.init(params)
    initial = state
    grads = [random_tree(params, 30 + t) for t in range(3)]
    for t in range(2):
        u, state = tx.update(grads[t], state, params)
        np.testing.assert_array_equal(u["w"], 0.0)
    assert int(optax.tree.get(state, "sift_count")) == 2
    for a, b in zip(jax.tree.leaves(state)[1:], jax.tree.leaves(initial)[1:], strict=True):
        np.testing.assert_array_equal(a, b)  # indices, moments and Adam's count untouched
    u, state = tx.update(grads[2], state, params)
    chosen = set(np.asarray(optax.tree.get(state, "sift_indices")["w"])[0].tolist())
    assert chosen == top_k_rows(grads[2]["w"], 1, 3)[0]
    assert set(np.flatnonzero(np.asarray(u["w"]).ravel()).tolist()) == chosen


def test_unselected_leaves_get_plain_adamw_and_non_floats_stay():
    params = random_tree({"w": jnp.zeros((4, 4)), "b": jnp.zeros(5)}, 2)
    params["step"] = jnp.int32(7)
    kw = dict(b1=0.8, b2=0.9, eps=1e-6, weight_decay=0.1)
    tx = omgd_jax.sift(0.1, 0.25, leaves="^w$", **kw)
    ref = optax.adamw(0.1, **kw)
    s, r = tx.init(params), ref.init({"b": params["b"]})
    assert isinstance(optax.tree.get(s, "sift_indices")["b"], optax.MaskedNode)
    for t in range(3):
        g = random_tree({"w": params["w"], "b": params["b"]}, 40 + t)
        u, s = tx.update({**g, "step": jnp.int32(1)}, s, params)
        v, r = ref.update({"b": g["b"]}, r, {"b": params["b"]})
        np.testing.assert_allclose(u["b"], v["b"], rtol=1e-6)
        assert int(optax.apply_updates(params, u)["step"]) == 7


@settings(max_examples=15, deadline=None)
@given(
    g=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6),
        elements=st.floats(-100, 100, width=32),
        unique=True,
    ),
    rate=st.floats(0.01, 1.0),
)
def test_property_the_subset_is_a_top_k_set(g, rate):
    params = {"x": jnp.zeros(g.shape)}
    tx = omgd_jax.sift(1.0, rate)
    _, state = tx.update({"x": jnp.asarray(g)}, tx.init(params), params)
    k = min(g.size, max(1, math.ceil(rate * g.size)))
    chosen = np.asarray(optax.tree.get(state, "sift_indices")["x"])[0]
    assert len(set(chosen.tolist())) == k
    mags = np.abs(g).ravel()
    rest = np.setdiff1d(np.arange(g.size), chosen)
    assert rest.size == 0 or mags[chosen].min() >= mags[rest].max()


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"sparse_rate must be in \(0, 1\]"):
        omgd_jax.sift(0.1, 0.0)
    with pytest.raises(ValueError, match=r"sparse_rate must be in \(0, 1\]"):
        omgd_jax.sift(0.1, 1.5)
    with pytest.raises(TypeError, match="sparse_rate must be a float"):
        omgd_jax.sift(0.1, "0.1")
    with pytest.raises(ValueError, match="select_step must be >= 0"):
        omgd_jax.sift(0.1, select_step=-1)
    with pytest.raises(TypeError, match="leaves must be None, a regex"):
        omgd_jax.sift(0.1, leaves=3)
    with pytest.raises(TypeError, match="stacked must be None, a regex"):
        omgd_jax.sift(0.1, stacked=[1])
    with pytest.raises(ValueError, match="selects no leaf"):
        omgd_jax.sift(0.1, leaves="^nothing").init({"w": jnp.ones(3)})
    with pytest.raises(ValueError, match="weight decay needs params"):
        tx = omgd_jax.sift(0.1, weight_decay=0.1)
        tx.update({"w": jnp.ones(3)}, tx.init({"w": jnp.ones(3)}))


def test_init_on_shapes_stable_state_under_jit_and_chain():
    params = stacked_tree(num_layers=2, width=3)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0), omgd_jax.sift(1e-2, 0.2, select_step=1, stacked="^blocks/")
    )
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    spec = lambda s: jax.tree.map(lambda a: (a.shape, a.dtype), s)
    state = tx.init(params)
    assert spec(tx.init(abstract)) == spec(state) == spec(jax.eval_shape(tx.init, abstract))
    traces = []

    @jax.jit
    def step(s, g):
        traces.append(1)
        return tx.update(g, s, params, unknown_extra=1.0)

    for t in range(4):
        _, new = step(state, random_tree(params, t))
        assert spec(new) == spec(state)
        state = new
    assert len(traces) == 1


def test_multisteps_selects_on_the_mean_gradient_and_map_params():
    params = {"w": jnp.zeros(12)}
    multi = optax.MultiSteps(omgd_jax.sift(0.1, 0.25), every_k_schedule=3)
    state = multi.init(params)
    micro = [random_tree(params, 50 + t) for t in range(3)]
    for g in micro:
        _, state = multi.update(g, state, params)
    mean = sum(np.asarray(g["w"]) for g in micro) / 3
    chosen = set(np.asarray(optax.tree.get(state, "sift_indices")["w"])[0].tolist())
    assert chosen == top_k_rows(mean, 1, 3)[0]
    tx = omgd_jax.sift(0.1)
    mapped = optax.tree.map_params(
        tx, lambda x: "params", tx.init(params), transform_non_params=lambda _: "other"
    )
    assert set(jax.tree.leaves(mapped)) == {"other"}  # nothing params-shaped in the state


def test_inject_hyperparams_with_static_args():
    params = random_tree({"w": jnp.zeros((4, 5))}, 0)
    make = optax.inject_hyperparams(omgd_jax.sift, static_args=SIFT_STATIC)
    tx = make(0.1, 0.2, weight_decay=0.0)
    state = tx.init(params)
    g = random_tree(params, 1)
    u1, _ = tx.update(g, state, params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.4)
    u2, _ = tx.update(g, state, params)
    np.testing.assert_allclose(u2["w"], 4 * u1["w"], rtol=1e-6)


def test_scale_by_sift_then_lr_is_sift():
    params = {"w": jnp.ones((3, 5)), "b": jnp.ones(3)}
    full = omgd_jax.sift(0.1, 0.4, leaves="w", weight_decay=0.01)
    parts = optax.chain(
        omgd_jax.scale_by_sift(0.4, leaves="w", weight_decay=0.01),
        optax.scale_by_learning_rate(0.1),
    )
    s1, s2 = full.init(params), parts.init(params)
    for t in range(3):
        g = jax.tree.map(
            lambda x, t=t: jnp.cos(jnp.arange(x.size, dtype=jnp.float32) * (t + 1)).reshape(
                x.shape
            ),
            params,
        )
        u1, s1 = full.update(g, s1, params)
        u2, s2 = parts.update(g, s2, params)
        jax.tree.map(np.testing.assert_array_equal, u1, u2)
