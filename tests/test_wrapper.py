"""`omgd`, `omgd_adamw`: the masks of `omgd_mask` in either state; the checks (omgd_jax.wrapper)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import omgd_jax
from tests.conftest import random_tree, stacked_tree

CASES = [
    ("compact", dict(granularity="element")),
    ("compact", dict(granularity="layer", layers=r"^blocks/")),
    ("frozen", dict(granularity="element")),
    ("frozen", dict(granularity="element", layout="random")),
    ("frozen", dict(granularity="tensor")),
    ("frozen", dict(granularity="layer", layers=r"^blocks/")),
]


@pytest.mark.parametrize("state, kwargs", CASES)
@pytest.mark.parametrize("num_masks", [1, 2, 4])
def test_omgd_sgd_equals_mask_then_sgd(state, kwargs, num_masks):
    params = stacked_tree(num_layers=4)
    tx = omgd_jax.omgd(optax.sgd(0.1), num_masks, 2, key=7, state=state, **kwargs)
    ref = optax.chain(omgd_jax.omgd_mask(num_masks, 2, key=7, **kwargs), optax.sgd(0.1))
    s1, s2 = tx.init(params), ref.init(params)
    f1, f2 = jax.jit(tx.update), jax.jit(ref.update)
    for t in range(3 * num_masks * 2):
        g = random_tree(params, t)
        u1, s1 = f1(g, s1, params)
        u2, s2 = f2(g, s2, params)
        jax.tree.map(np.testing.assert_array_equal, u1, u2)


def test_mask_index_reaches_the_wrapper():
    params = {"w": jnp.ones((8,))}
    tx = omgd_jax.omgd(optax.sgd(1.0), 4, 3, key=1)
    ref = omgd_jax.omgd_mask(4, 3, key=1)
    g = {"w": jnp.arange(8.0)}
    u1, _ = tx.update(g, tx.init(params), params, mask_index=3)
    u2, _ = ref.update(g, ref.init(params), params, mask_index=3)
    np.testing.assert_array_equal(u1["w"], -u2["w"])


def test_placements_of_the_mask_do_what_the_docs_say():
    params = {"w": jnp.zeros((4,))}
    g = {"w": jnp.ones(4)}

    def run(tx, steps=2):
        state, p, moves = tx.init(params), params, []
        for _ in range(steps):
            u, state = tx.update(g, state, p)
            p = optax.apply_updates(p, u)
            moves.append(np.asarray(u["w"]) != 0)
        return moves

    mask = lambda **kw: omgd_jax.omgd_mask(2, 1, key=0, **kw)
    before = run(optax.chain(mask(), optax.sgd(0.1, momentum=0.9)))
    after = run(optax.chain(optax.sgd(0.1, momentum=0.9), mask(scale=False)))
    wrapped = run(omgd_jax.omgd(optax.sgd(0.1, momentum=0.9), 2, 1, key=0))
    # Step 2's active half is step 1's inactive half. Before: step 1's half keeps drifting on
    # its momentum, so all 4 coordinates move. After and wrapped: only the active half moves.
    assert before[1].all()
    assert after[1].sum() == 2 and wrapped[1].sum() == 2
    np.testing.assert_array_equal(after[1], wrapped[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(state="sparse"), "state must be one of"),
        (dict(granularity="tensor"), "state='compact' supports granularity"),
        (dict(layout="random"), "needs layout='contiguous'"),
        (dict(warmup_steps=10), "warmup_steps must be 0 with state='compact'"),
    ],
)
def test_bad_wrapper_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        omgd_jax.omgd(optax.adam(1e-3), 2, **kwargs)


def test_inner_must_be_a_gradient_transformation():
    with pytest.raises(TypeError, match="inner must be an optax.GradientTransformation"):
        omgd_jax.omgd(optax.adam, 2)


@pytest.mark.parametrize("state", ["compact", "frozen"])
def test_a_tree_that_does_not_match_init_is_an_error(state):
    tx = omgd_jax.omgd(optax.adam(1e-3), 2, state=state)
    s = tx.init({"a": jnp.ones(4), "b": jnp.ones(6)})
    with pytest.raises(ValueError, match="does not match the tree given to init"):
        tx.update({"a": jnp.ones(4)}, s)
    with pytest.raises(ValueError, match="does not match the tree given to init"):
        tx.update({"a": jnp.ones(4), "b": jnp.ones(10)}, s)
