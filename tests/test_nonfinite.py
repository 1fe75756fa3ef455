"""Non-finite steps: with `optax.apply_if_finite` or `optax.MultiSteps(should_skip_update_fn=
optax.skip_not_finite)` a step whose gradient holds NaN/Inf is dropped whole: no update, and the
traversal (step counter, phase, compact buffers) stays where it was, so the run continues exactly
as if the step had never happened."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import omgd_jax
from tests.conftest import random_tree, stacked_tree

LAYERS = r"^blocks/"


def forms():
    layer = dict(granularity="layer", layers=LAYERS, layers_per_phase=2, steps_per_mask=2)
    return {
        "mask": lambda: optax.chain(omgd_jax.omgd_mask(2, 2), optax.adam(0.1)),
        "compact-element": lambda: omgd_jax.omgd_adamw(0.1, num_masks=2, steps_per_mask=2),
        "compact-layer": lambda: omgd_jax.omgd_adamw(0.1, **layer),
        "frozen": lambda: omgd_jax.omgd_adamw(0.1, num_masks=2, steps_per_mask=2, state="frozen"),
    }


GUARDS = {
    "apply_if_finite": lambda tx: optax.apply_if_finite(tx, max_consecutive_errors=3),
    "skip_not_finite": lambda tx: optax.MultiSteps(
        tx, every_k_schedule=1, should_skip_update_fn=optax.skip_not_finite
    ),
}


def poisoned(grads):
    return jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)


def run(tx, params, grads_list):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads_list:
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


def step_of(state):
    return int(optax.tree.get_all_with_path(state, "omgd_step")[0][1])


@pytest.mark.parametrize("guard", GUARDS)
@pytest.mark.parametrize("form", forms())
def test_a_non_finite_step_is_dropped_whole(form, guard):
    params = random_tree(stacked_tree(), 0)
    grads = [random_tree(params, 10 + t) for t in range(5)]
    tx = GUARDS[guard](forms()[form]())
    # Mid-phase (step 3 of phases of 2): the NaN step between grads[2] and grads[3].
    with_nan = grads[:3] + [poisoned(grads[3])] + grads[3:]
    p_nan, s_nan = run(tx, params, with_nan)
    p_ref, s_ref = run(tx, params, grads)
    jax.tree.map(np.testing.assert_array_equal, p_nan, p_ref)
    assert step_of(s_nan) == step_of(s_ref) == 5  # the traversal did not advance
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(p_nan))


def test_without_a_guard_the_traversal_advances_and_the_buffers_restart_with_the_phase():
    """The documented unguarded behaviour: the NaN step counts (phase advances); compact
    buffers hold NaN until the mask changes, then restart from zero."""
    params = {"w": jnp.ones((4, 2))}
    tx = omgd_jax.omgd(optax.adam(0.1), 2, 2)
    state = tx.init(params)
    nan = {"w": jnp.full((4, 2), jnp.nan)}
    _, state = tx.update(nan, state, params)  # phase 0, step 0
    assert int(state.omgd_step) == 1
    assert np.isnan(optax.tree.get(state, "mu")["w"]).all()
    _, state = tx.update({"w": jnp.ones((4, 2))}, state, params)  # still phase 0
    assert np.isnan(optax.tree.get(state, "mu")["w"]).all()
    _, state = tx.update({"w": jnp.ones((4, 2))}, state, params)  # phase 1: fresh buffers
    assert np.isfinite(optax.tree.get(state, "mu")["w"]).all()


@pytest.mark.parametrize("guard", ["apply_if_finite"])
def test_lean_step_drops_a_non_finite_step(guard):
    """(`optax.MultiSteps` accumulates full-size gradients, so it does not take the lean step's
    [gamma, ...] views: guard the lean step with `optax.apply_if_finite`.)"""
    params = random_tree(stacked_tree(), 0)
    tx = GUARDS[guard](
        omgd_jax.omgd_adamw(
            0.1, granularity="layer", layers=LAYERS, layers_per_phase=2, steps_per_mask=2
        )  # fmt: skip
    )

    def loss(p, x):
        h = omgd_jax.scan_layers(
            lambda layer, h: jnp.tanh(h @ layer["attn"]["kernel"][:, :3] * layer["ln"]["scale"]),
            p["blocks"],
            x @ p["wte"].T @ p["wte"],
        )
        return jnp.sum(h * p["ln_f"]) ** 2

    step = jax.jit(omgd_jax.lean_train_step(loss, tx, layers=LAYERS))
    xs = [jax.random.normal(jax.random.key(t), (5, 3)) for t in range(4)]
    bad = jnp.full((5, 3), jnp.nan)

    def go(batches):
        p, s = params, tx.init(params)
        for x in batches:
            p, s, _ = step(p, s, x)
        return p, s

    p_nan, s_nan = go(xs[:2] + [bad] + xs[2:])
    p_ref, s_ref = go(xs)
    jax.tree.map(np.testing.assert_array_equal, p_nan, p_ref)
    assert step_of(s_nan) == step_of(s_ref) == 4
