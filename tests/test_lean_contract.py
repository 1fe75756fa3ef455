"""The lean step never trains nothing silently; micro-batches equal one big batch; the typed
contract with the compact state; every layer trains in exactly one phase of each cycle."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import omgd_jax
from tests.test_lean import LAYERS, N_LAYERS, D, layer, loss_of, make_params

X = jax.random.normal(jax.random.key(3), (8, D))


def lean_grads(fun, params, ids=(4, 1)):
    return jax.jit(omgd_jax.lean_value_and_grad(fun, layers=LAYERS))(params, jnp.array(ids), X)


# ------------------------------------------------------------- no silent no-op, case by case
def cast_before_scan(params, x):
    blocks = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params["blocks"])
    h = omgd_jax.scan_layers(layer, blocks, (x @ params["embed"]).astype(jnp.bfloat16))
    return jnp.mean((h.astype(jnp.float32) @ params["head"]) ** 2)


def scaled_before_scan(params, x):
    blocks = jax.tree.map(lambda w: 0.5 * w, params["blocks"])
    return jnp.mean(
        (omgd_jax.scan_layers(layer, blocks, x @ params["embed"]) @ params["head"]) ** 2
    )


def constrained_before_scan(params, x):
    blocks = jax.lax.with_sharding_constraint(
        params["blocks"], jax.sharding.SingleDeviceSharding(jax.devices()[0])
    )
    return jnp.mean(
        (omgd_jax.scan_layers(layer, blocks, x @ params["embed"]) @ params["head"]) ** 2
    )


def never_scans(params, x):
    h = jax.lax.scan(lambda h, p: (layer(p, h), None), x @ params["embed"], params["blocks"])[0]
    return jnp.mean((h @ params["head"]) ** 2)


def ignores_the_stack(params, x):
    return jnp.mean((x @ params["embed"] @ params["head"]) ** 2)


def regularised_outside_scan(params, x):
    return loss_of(params, x) + 1e-3 * sum(jnp.sum(w**2) for w in jax.tree.leaves(params["blocks"]))


@pytest.mark.parametrize(
    "fun",
    [cast_before_scan, scaled_before_scan, constrained_before_scan, never_scans, ignores_the_stack],
)
def test_a_stack_that_does_not_reach_scan_layers_raises_naming_the_fix(fun):
    with pytest.raises(ValueError, match=r"never ran the stacked leaves 'blocks/.*inside layer_fn"):
        lean_grads(fun, make_params())


def test_a_stack_also_used_outside_scan_layers_raises():
    with pytest.raises(ValueError, match=r"used outside omgd_jax.scan_layers too"):
        lean_grads(regularised_outside_scan, make_params())


def test_the_same_errors_reach_the_train_step():
    params = make_params()
    tx = omgd_jax.omgd_adamw(1e-2, granularity="layer", layers=LAYERS, layers_per_phase=2)
    step = jax.jit(omgd_jax.lean_train_step(cast_before_scan, tx, layers=LAYERS))
    with pytest.raises(ValueError, match="never ran the stacked leaves"):
        step(params, tx.init(params), X)


def test_casting_inside_layer_fn_trains_with_the_slices_of_jax_grad():
    """The fix the error names: mixed precision inside layer_fn gives the exact gradient."""

    def bf16_layer(p, h):
        p = jax.tree.map(lambda w: w.astype(jnp.bfloat16), p)
        return layer(p, h.astype(jnp.bfloat16)).astype(jnp.float32)

    def fun(params, x):
        h = omgd_jax.scan_layers(bf16_layer, params["blocks"], x @ params["embed"])
        return jnp.mean((h @ params["head"]) ** 2)

    params = make_params()
    _, full = jax.value_and_grad(fun)(params, X)
    _, grads = lean_grads(fun, params, ids=(4, 1))
    for name, g in grads["blocks"].items():
        assert float(jnp.max(jnp.abs(full["blocks"][name]))) > 0
        np.testing.assert_allclose(g, full["blocks"][name][jnp.array([4, 1])], rtol=2e-2, atol=1e-3)


# ------------------------------------------------------------- micro-batches == one batch
def adamw_layer():
    return omgd_jax.omgd_adamw(
        1e-2, granularity="layer", layers=LAYERS, layers_per_phase=2, steps_per_mask=2
    )


@pytest.mark.parametrize("kind", ["lean", "dense compact", "adamw"])
def test_micro_batches_equal_one_big_batch(kind):
    """Four micro-batches of 2 rows == one batch of 8 (the loss is a mean over rows, so the
    mean of the micro-batch gradients is the big batch's); rtol 1e-5 (summation order)."""
    params = make_params()
    if kind == "adamw":
        tx, make = optax.adamw(1e-2), omgd_jax.train_step
    elif kind == "dense compact":
        tx, make = adamw_layer(), omgd_jax.train_step
    else:
        tx = adamw_layer()

        def make(loss, tx, **kw):
            return omgd_jax.lean_train_step(loss, tx, layers=LAYERS, **kw)

    big = jax.jit(make(loss_of, tx))
    micro = jax.jit(make(loss_of, tx, microbatches=4))
    xs = X.reshape(4, 2, D)
    p1, s1, p2, s2 = params, tx.init(params), params, tx.init(params)
    for _ in range(3):
        p1, s1, v1 = big(p1, s1, X)
        p2, s2, v2 = micro(p2, s2, xs)
        np.testing.assert_allclose(v2, v1, rtol=1e-5)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), p1, params)
    assert max(jax.tree.leaves(moved)) > 1e-3  # it trained
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p2)


def test_micro_batch_axis_is_checked():
    tx = adamw_layer()
    step = omgd_jax.lean_train_step(loss_of, tx, layers=LAYERS, microbatches=3)
    params = make_params()
    with pytest.raises(ValueError, match="micro-batch axis of that size"):
        step(params, tx.init(params), X.reshape(4, 2, D))
    with pytest.raises(ValueError, match="microbatches must be"):
        omgd_jax.train_step(loss_of, tx, microbatches=0)


# ------------------------------------------------------------- the contract and coverage
def test_active_layers_is_found_by_type_through_wrappers():
    params = make_params()
    tx = optax.chain(optax.clip_by_global_norm(1.0), adamw_layer())
    wrapped = optax.MultiSteps(optax.inject_hyperparams(lambda: tx)(), every_k_schedule=2)
    state = wrapped.init(params)
    np.testing.assert_array_equal(
        omgd_jax.active_layers(state), omgd_jax.active_layers(adamw_layer().init(params))
    )


def test_every_layer_moves_in_exactly_one_phase_of_each_cycle():
    """Read from the parameters: over two cycles of N_L/gamma phases, each block's weights
    change during exactly one phase per cycle, and the always-active leaves every step."""
    gamma, k = 2, 2
    tx = omgd_jax.omgd_adamw(
        1e-2, granularity="layer", layers=LAYERS, layers_per_phase=gamma, steps_per_mask=k
    )
    step = jax.jit(omgd_jax.lean_train_step(loss_of, tx, layers=LAYERS))
    params, state = make_params(), None
    state = tx.init(params)
    phases = N_LAYERS // gamma
    for cycle in range(2):
        moved_in = np.zeros((phases, N_LAYERS), bool)
        for phase in range(phases):
            before = params
            for _ in range(k):
                params, state, _ = step(params, state, X)
            moved_in[phase] = [
                any(
                    bool(jnp.any(params["blocks"][n][i] != before["blocks"][n][i]))
                    for n in params["blocks"]
                )
                for i in range(N_LAYERS)
            ]
            assert bool(jnp.any(params["embed"] != before["embed"]))
        assert (moved_in.sum(axis=0) == 1).all(), (cycle, moved_in.astype(int))
        assert (moved_in.sum(axis=1) == gamma).all(), (cycle, moved_in.astype(int))


@pytest.mark.parametrize("remat", [True, False])
def test_layer_fn_closing_over_traced_arrays_gets_the_slices_of_jax_grad(remat):
    """A layer that reads arrays computed in the loss from its inputs (rotary tables, a packing
    mask) through its closure: each active layer still gets its exact gradient."""

    def fun(params, x):
        gate = jax.nn.sigmoid(jnp.cumsum(x, axis=-1))  # traced, not a function of params

        def gated(p, h):
            return gate * layer(p, h)

        h = omgd_jax.scan_layers(gated, params["blocks"], x @ params["embed"], remat=remat)
        return jnp.mean((h @ params["head"]) ** 2)

    params = make_params()
    _, full = jax.value_and_grad(fun)(params, X)
    _, grads = lean_grads(fun, params, ids=(5, 2))
    np.testing.assert_allclose(grads["embed"], full["embed"], rtol=1e-5, atol=1e-7)
    for name, g in grads["blocks"].items():
        np.testing.assert_allclose(g, full["blocks"][name][jnp.array([5, 2])], rtol=1e-5, atol=1e-7)


def test_layer_fn_closing_over_a_function_of_the_params_is_refused_loudly():
    """Documented limit: what layer_fn closes over must not depend on the trained leaves (pass
    it in the carried activation instead); JAX refuses it rather than dropping its gradient."""

    def fun(params, x):
        gate = jax.nn.sigmoid(x @ params["embed"])
        h = omgd_jax.scan_layers(lambda p, h: gate * layer(p, h), params["blocks"], x)
        return jnp.mean((h @ params["head"]) ** 2)

    with pytest.raises(jax.errors.UnexpectedTracerError):
        lean_grads(fun, make_params())
