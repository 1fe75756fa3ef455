"""The lean layer-wise step: only the active layers are differentiated, stored and updated."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend.core import jaxprs_in_params

import omgd_jax

LAYERS = r"^blocks/"
N_LAYERS, D, H = 6, 8, 16


def layer(p, h):
    return h + jnp.tanh(h @ p["w1"] + p["b1"]) @ p["w2"]


def make_params(seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    return {
        "embed": jax.random.normal(k[0], (D, D)) * 0.5,
        "blocks": {
            "w1": jax.random.normal(k[1], (N_LAYERS, D, H)) * 0.3,
            "b1": jax.random.normal(k[2], (N_LAYERS, H)) * 0.1,
            "w2": jax.random.normal(k[3], (N_LAYERS, H, D)) * 0.3,
        },
        "head": jax.random.normal(k[4], (D,)),
    }


def loss_of(params, x, remat=True):
    h = omgd_jax.scan_layers(layer, params["blocks"], x @ params["embed"], remat=remat)
    return jnp.mean((h @ params["head"]) ** 2)


@pytest.mark.parametrize("remat", [True, False])
def test_grads_equal_the_slices_of_the_full_gradient(remat):
    params = make_params()
    x = jax.random.normal(jax.random.key(9), (5, D))
    ids = jnp.array([4, 1])
    full_value, full = jax.value_and_grad(loss_of)(params, x, remat)
    fun = functools.partial(loss_of, remat=remat)
    value, grads = jax.jit(omgd_jax.lean_value_and_grad(fun, layers=LAYERS))(params, ids, x)
    np.testing.assert_allclose(value, full_value, rtol=1e-6)
    for name in ("embed", "head"):  # always-active leaves: in full
        np.testing.assert_allclose(grads[name], full[name], rtol=1e-5, atol=1e-7)
    for name, g in grads["blocks"].items():  # the [gamma, ...] view, slot s = layer ids[s]
        assert g.shape == (2,) + params["blocks"][name].shape[1:]
        np.testing.assert_allclose(g, full["blocks"][name][ids], rtol=1e-5, atol=1e-7)


def test_gradient_tree_has_no_full_stack_leaf():
    params = make_params()
    grads = jax.eval_shape(
        omgd_jax.lean_value_and_grad(loss_of, layers=LAYERS),
        params,
        jnp.array([0, 5]),
        jnp.ones((3, D)),
    )[1]
    assert all(g.shape[0] == 2 for g in jax.tree.leaves(grads["blocks"]))


def test_inactive_layers_get_no_weight_gradient_matmuls():
    """remat: the inactive layers' backward runs in loops with no x^T dy; each active layer's
    full backward runs once, outside the loops (its weight cotangent a buffer of its own)."""
    params = make_params()
    f = omgd_jax.lean_value_and_grad(loss_of, layers=LAYERS)

    def jaxpr_of(ids):
        return jax.make_jaxpr(f)(params, jnp.array(ids), jnp.ones((3, D))).jaxpr

    def eqns(jaxpr, name, into_loops=True):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == name:
                yield eqn
            if into_loops or eqn.primitive.name not in ("while", "scan"):
                for sub in jaxprs_in_params(eqn.params):
                    yield from eqns(sub, name, into_loops)

    def dots(jaxpr, into_loops=True):
        return sum(1 for _ in eqns(jaxpr, "dot_general", into_loops))

    two, one = jaxpr_of([0, 5]), jaxpr_of([3])
    assert {e.params["length"] for e in eqns(two, "scan")} == {N_LAYERS}  # the forward
    # gamma + 1 loops (above the highest active layer, between, below the lowest), each
    # recomputing a layer (2 matmuls) and giving its input cotangent (2), no weight cotangent.
    loops = list(eqns(two, "while"))
    assert len(loops) == 3 and len(list(eqns(one, "while"))) == 2
    assert [dots(e.params["body_jaxpr"].jaxpr) for e in loops] == [4, 4, 4]
    # One more active layer: one more full backward outside the loops, recompute (2), input
    # cotangent (2), weight cotangent (2).
    assert dots(two, into_loops=False) - dots(one, into_loops=False) == 6


def dense_step(tx):
    def step(params, state, x):
        value, grads = jax.value_and_grad(loss_of)(params, x)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    return step


@pytest.mark.parametrize("traversal,scale", [("wor", True), ("iid", False)])
def test_lean_step_equals_the_dense_compact_step_over_phases(traversal, scale):
    tx = omgd_jax.omgd_adamw(
        1e-2,
        weight_decay=0.1,
        granularity="layer",
        layers=LAYERS,
        layers_per_phase=2,
        steps_per_mask=2,
        traversal=traversal,
        scale=scale,
        key=3,
    )
    lean = jax.jit(omgd_jax.lean_train_step(loss_of, tx, layers=LAYERS), donate_argnums=(0, 1))
    dense = jax.jit(dense_step(tx))
    params = make_params()
    pl, sl = jax.tree.map(jnp.copy, params), tx.init(params)
    pd, sd = params, tx.init(params)
    seen = set()
    for t in range(9):  # 4+ phases: resets of the compact state included
        x = jax.random.normal(jax.random.key(t), (4, D))
        ids = np.asarray(omgd_jax.active_layers(sl))
        seen.update(ids.tolist())
        before = jax.tree.map(np.asarray, pl["blocks"])
        pl, sl, vl = lean(pl, sl, x)
        pd, sd, vd = dense(pd, sd, x)
        np.testing.assert_allclose(vl, vd, rtol=1e-6)
        # tolerance: the two paths sum the same float32 terms in different orders
        for a, b in zip(jax.tree.leaves(pl), jax.tree.leaves(pd), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        inactive = sorted(set(range(N_LAYERS)) - set(ids.tolist()))
        for name, a in pl["blocks"].items():  # inactive layers: bit-for-bit unchanged
            np.testing.assert_array_equal(np.asarray(a)[inactive], before[name][inactive])
    assert lean._cache_size() == 1  # one compiled program for every phase
    assert len(seen) > 2  # several phases with different layers were run


def test_active_layers_follow_the_schedule():
    tx = omgd_jax.omgd_adamw(
        1e-2, granularity="layer", layers=LAYERS, layers_per_phase=2, steps_per_mask=1
    )
    params = make_params()
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    cycle = []
    for _ in range(3):  # one cycle of M = 3 phases covers every layer once (wor)
        cycle += np.asarray(omgd_jax.active_layers(state)).tolist()
        _, state = tx.update(zeros, state, params)
    assert sorted(cycle) == list(range(N_LAYERS))


def test_errors_name_the_problem():
    params = make_params()
    with pytest.raises(ValueError, match="exactly one layer-wise compact"):
        omgd_jax.active_layers(optax.adam(1e-3).init(params))
    with pytest.raises(ValueError, match="both or neither"):
        omgd_jax.scan_layers(layer, params["blocks"], jnp.ones((2, D)), ids=jnp.array([0]))
    with pytest.raises(ValueError, match="len\\(ids\\)"):
        view = omgd_jax.gather_layers(params["blocks"], jnp.array([0, 1]))
        omgd_jax.scan_layers(layer, params["blocks"], jnp.ones((2, D)), view, jnp.array([0]))
    tx = omgd_jax.omgd_adamw(1e-2, num_masks=2)  # element granularity
    with pytest.raises(ValueError, match="granularity='layer'"):
        ids = omgd_jax.LayerIds(jnp.array([0]), 6)
        tx.update(params, tx.init(params), params, layer_ids=ids)
    layer_tx = omgd_jax.omgd_adamw(1e-2, granularity="layer", layers=LAYERS, layers_per_phase=1)
    with pytest.raises(TypeError, match="LayerIds"):
        layer_tx.update(params, layer_tx.init(params), params, layer_ids=jnp.array([0]))
    unrolled = {"h_0": {"w": jnp.ones(2)}, "h_1": {"w": jnp.ones(2)}}
    with pytest.raises(ValueError, match="stacked layers"):
        omgd_jax.layer_view(unrolled, jnp.array([0]), layers=r"h_(\d+)/")


def test_scatter_writes_only_the_given_layers():
    stack = {"w": jnp.arange(12.0).reshape(6, 2)}
    out = omgd_jax.scatter_layers(stack, {"w": -jnp.ones((2, 2))}, jnp.array([5, 2]))
    expected = np.arange(12.0).reshape(6, 2)
    expected[[5, 2]] = -1
    np.testing.assert_array_equal(out["w"], expected)


def test_add_to_layers_adds_as_apply_updates_and_keeps_the_rest():
    # bf16 stack, f32 updates: each written layer is (w + u) in f32 rounded once to bf16.
    rng = np.random.default_rng(0)
    stack = {"w": jnp.asarray(rng.normal(size=(6, 3)), jnp.bfloat16)}
    upd = {"w": jnp.asarray(rng.normal(size=(2, 3)) * 1e-2, jnp.float32)}
    ids = jnp.array([4, 1])
    out = jax.jit(omgd_jax.add_to_layers, donate_argnums=0)(jax.tree.map(jnp.copy, stack), upd, ids)
    view = omgd_jax.gather_layers(stack, ids)
    expected = np.asarray(stack["w"]).copy()
    expected[[4, 1]] = np.asarray(optax.apply_updates(view, upd)["w"])
    assert out["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out["w"]), expected)


def test_the_update_writes_the_stack_in_place():
    # Donated and updated layer by layer: no temporary the size of the stack or of the view.
    stack = {"w": jax.ShapeDtypeStruct((12, 256, 256), jnp.float32)}
    upd = {"w": jax.ShapeDtypeStruct((3, 256, 256), jnp.float32)}
    ids = jax.ShapeDtypeStruct((3,), jnp.int32)
    compiled = jax.jit(omgd_jax.add_to_layers, donate_argnums=0).lower(stack, upd, ids).compile()
    layer_bytes = 256 * 256 * 4
    assert compiled.memory_analysis().temp_size_in_bytes < layer_bytes


def test_residuals_shared_by_every_layer_are_kept_once():
    # Each layer multiplies by a causal mask built inside it: a 256 KiB residual that depends
    # on neither the weights nor the input. Stored per layer it would take 16 x 256 KiB.
    T, n = 256, 16

    def layer(p, h):
        mask = jnp.tril(jnp.ones((T, T), jnp.float32))
        return jnp.tanh(p["w"] * (mask @ h))

    params = {"blocks": {"w": jnp.full((n, 1), 0.5)}}

    def loss(p, x):
        return omgd_jax.scan_layers(layer, p["blocks"], x, remat=False).sum()

    grad = omgd_jax.lean_value_and_grad(loss, layers="^blocks/")
    x, ids = jnp.ones((T, 1)), jnp.array([3])
    compiled = jax.jit(grad).lower(params, ids, x).compile()
    mask_bytes = T * T * 4
    assert compiled.memory_analysis().temp_size_in_bytes < 3 * mask_bytes
    # and the gradient is still the dense one's, layer 3 of 16
    dense = jax.grad(loss)(params, x)["blocks"]["w"][3]
    np.testing.assert_allclose(grad(params, ids, x)[1]["blocks"]["w"][0], dense, rtol=1e-5)


def test_add_to_layers_in_the_stack_dtype_is_one_in_place_scatter():
    rng = np.random.default_rng(1)
    stack = {"w": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}
    upd = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
    ids = jnp.array([5, 0, 2])
    out = omgd_jax.add_to_layers(stack, upd, ids)
    expected = np.asarray(stack["w"]).copy()
    expected[[5, 0, 2]] = np.asarray(
        optax.apply_updates(omgd_jax.gather_layers(stack, ids), upd)["w"]
    )
    np.testing.assert_array_equal(out["w"], expected)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (stack, upd, ids))
    compiled = jax.jit(omgd_jax.add_to_layers, donate_argnums=0).lower(*shapes).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 4 * 4  # nothing the size of a layer
