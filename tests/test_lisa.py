"""LISA, LISA-wor and the i.i.d. masks: the core with the literature's arguments (omgd_jax.lisa)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import omgd_jax
from tests.conftest import masks_over, stacked_tree

LAYERS = r"^blocks/"


def random_tree(tree, seed):
    keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(tree)))
    leaves = [
        jax.random.normal(k, x.shape) for k, x in zip(keys, jax.tree.leaves(tree), strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def run_side_by_side(tx, ref, params, steps):
    s1, s2 = tx.init(params), ref.init(params)
    f1, f2 = jax.jit(tx.update), jax.jit(ref.update)
    for t in range(steps):
        g = random_tree(params, t)
        u1, s1 = f1(g, s1, params)
        u2, s2 = f2(g, s2, params)
        jax.tree.map(np.testing.assert_array_equal, u1, u2)
        params = optax.apply_updates(params, u1)
    jax.tree.map(np.testing.assert_array_equal, plain(s1), plain(s2))


def plain(tree):
    """PRNG keys as their raw data, so that states compare with NumPy."""
    is_key = lambda x: jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


ADAM = dict(b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1)


@pytest.mark.parametrize("state", ["compact", "frozen"])
def test_lisa_is_omgd_adamw_layer_iid_unscaled(state):
    params = random_tree(stacked_tree(num_layers=4), 100)
    common = dict(layers=LAYERS, layers_per_phase=2, steps_per_mask=2, key=5, state=state)
    tx = omgd_jax.lisa(1e-2, **common, **ADAM)
    ref = omgd_jax.omgd_adamw(
        1e-2, **common, **ADAM, granularity="layer", traversal="iid", scale=False
    )
    run_side_by_side(tx, ref, params, 8)


@pytest.mark.parametrize("scale", [True, False])
def test_lisa_wor_is_omgd_adamw_layer_wor(scale):
    params = random_tree(stacked_tree(num_layers=4), 101)
    common = dict(layers=LAYERS, layers_per_phase=1, steps_per_mask=2, key=3, scale=scale)
    tx = omgd_jax.lisa_wor(1e-2, **common, **ADAM)
    ref = omgd_jax.omgd_adamw(1e-2, **common, **ADAM, granularity="layer", traversal="wor")
    run_side_by_side(tx, ref, params, 8)


def active_layers(tx, num_layers, phases):
    """The set of trained layers of each phase (K = 1), read off the nonzero updates."""
    params = stacked_tree(num_layers=num_layers)
    updates = masks_over(tx, params, phases)
    return [
        frozenset(np.flatnonzero(np.abs(np.asarray(u["blocks"]["ln"]["scale"])).sum(1)).tolist())
        for u in updates
    ]


def test_lisa_draws_with_replacement_and_lisa_wor_covers_every_cycle():
    kw = dict(layers=LAYERS, layers_per_phase=1, steps_per_mask=1, weight_decay=0.0)
    num_layers, cycles = 4, 6
    iid = active_layers(omgd_jax.lisa(0.1, key=0, **kw), num_layers, num_layers * cycles)
    wor = active_layers(omgd_jax.lisa_wor(0.1, key=0, **kw), num_layers, num_layers * cycles)
    assert all(len(a) == 1 for a in iid + wor)
    for c in range(cycles):
        assert frozenset().union(*wor[4 * c : 4 * c + 4]) == frozenset(range(num_layers))
    # With replacement: for this seed, some window of N_L / gamma phases repeats a layer.
    windows = [frozenset().union(*iid[4 * c : 4 * c + 4]) for c in range(cycles)]
    assert any(len(w) < num_layers for w in windows)


def test_lisa_picks_every_layer_equally_often():
    kw = dict(layers=LAYERS, layers_per_phase=2, steps_per_mask=1, weight_decay=0.0, key=1)
    phases = 300
    active = active_layers(omgd_jax.lisa(0.1, **kw), 6, phases)
    counts = np.bincount([layer for a in active for layer in a], minlength=6)
    # Each layer is active with probability gamma / N_L = 1/3 per phase: 100 +- 8.2 (binomial).
    np.testing.assert_allclose(counts, phases / 3, atol=4 * np.sqrt(phases * (1 / 3) * (2 / 3)))


def test_lisa_does_not_scale_and_lisa_wor_does():
    # With eps >> |g| Adam's first step is linear, -lr * g / eps: the scale N_L/gamma shows.
    params = stacked_tree(num_layers=4)
    ones = jax.tree.map(jnp.ones_like, params)
    kw = dict(layers=LAYERS, layers_per_phase=1, steps_per_mask=1, weight_decay=0.0, eps=1e6)
    steps = {}
    for name, factory in [("lisa", omgd_jax.lisa), ("wor", omgd_jax.lisa_wor)]:
        tx = factory(1.0, **kw)
        u, _ = tx.update(ones, tx.init(params), params)
        layer = np.asarray(u["blocks"]["ln"]["scale"])
        assert np.count_nonzero(layer.any(1)) == 1
        steps[name] = (layer.min(), float(u["wte"][0, 0]))
    np.testing.assert_allclose(steps["lisa"][0], -1e-6, rtol=1e-5)  # unscaled
    np.testing.assert_allclose(steps["wor"][0], -4e-6, rtol=1e-5)  # N_L / gamma = 4
    np.testing.assert_allclose(steps["lisa"][1], -1e-6, rtol=1e-5)  # always-on leaves: scale 1
    assert steps["lisa"][1] == steps["wor"][1]
    # Compact Adam state: one layer of four.
    state = omgd_jax.lisa(0.1, **kw).init(params)
    mu = optax.tree.get(state, "omgd_active_state")[0].mu
    assert mu["blocks"]["attn"]["kernel"].shape[0] == 1


def test_iid_masks_are_omgd_mask_with_iid_traversal():
    tree = {"a": jnp.ones((6, 2)), "b": jnp.ones((5,)), "c": jnp.ones((3, 3))}
    cases = [
        (
            omgd_jax.iid_tensor_mask(2, 3, key=4, balance="size"),
            omgd_jax.omgd_mask(2, 3, key=4, granularity="tensor", traversal="iid", balance="size"),
        ),
        (
            omgd_jax.iid_element_mask(3, 2, key=4, layout="random"),
            omgd_jax.omgd_mask(
                3, 2, key=4, granularity="element", traversal="iid", layout="random"
            ),
        ),
        (
            omgd_jax.iid_element_mask(2, key=9, scale=False, warmup_steps=2),
            omgd_jax.omgd_mask(2, key=9, traversal="iid", scale=False, warmup_steps=2),
        ),
    ]
    for tx, ref in cases:
        got, want = masks_over(tx, tree, 8), masks_over(ref, tree, 8)
        jax.tree.map(np.testing.assert_array_equal, got, want)


def test_iid_tensor_mask_misses_coverage_for_some_cycle():
    tree = {f"t{i}": jnp.ones((2,)) for i in range(4)}
    masks = masks_over(omgd_jax.iid_tensor_mask(2, key=0), tree, 40)
    kept = [frozenset(k for k in tree if float(m[k][0]) > 0) for m in masks]
    assert all(len(k) == 2 for k in kept)
    cycles = [kept[i] | kept[i + 1] for i in range(0, 40, 2)]
    assert any(len(c) < 4 for c in cycles)


def test_bad_arguments_raise_clear_errors():
    kw = dict(layers=LAYERS, layers_per_phase=2, steps_per_mask=2)
    with pytest.raises(ValueError, match="state must be one of"):
        omgd_jax.lisa(0.1, **kw, state="dense")
    with pytest.raises(ValueError, match="steps_per_mask must be >= 1"):
        omgd_jax.lisa(0.1, layers=LAYERS, layers_per_phase=2, steps_per_mask=0)
    with pytest.raises(TypeError, match="key must be"):
        omgd_jax.lisa_wor(0.1, **kw, key="seed")
    with pytest.raises(TypeError, match="missing"):
        omgd_jax.lisa(0.1, layers=LAYERS, steps_per_mask=2)  # gamma is required
    with pytest.raises(ValueError, match="must divide"):
        omgd_jax.lisa(0.1, layers=LAYERS, layers_per_phase=3, steps_per_mask=1).init(
            stacked_tree(num_layers=4)
        )
    with pytest.raises(ValueError, match="layout must be one of"):
        omgd_jax.iid_element_mask(2, layout="striped")
    with pytest.raises(ValueError, match="balance must be one of"):
        omgd_jax.iid_tensor_mask(2, balance="bytes")
    with pytest.raises(ValueError, match="num_masks must be >= 1"):
        omgd_jax.iid_tensor_mask(0)


LISA_STATIC = (
    "layers",
    "layers_per_phase",
    "steps_per_mask",
    "key",
    "mask",
    "state",
    "units",
    "frozen",
)


def test_static_args_of_the_aliases():
    assert set(omgd_jax.static_args(omgd_jax.lisa)) == set(LISA_STATIC)
    assert set(omgd_jax.static_args(omgd_jax.lisa_wor)) == set(LISA_STATIC) | {
        "scale",
        "repartition",
    }
    assert set(omgd_jax.static_args(omgd_jax.iid_tensor_mask)) == {
        "num_masks",
        "steps_per_mask",
        "key",
        "scale",
        "warmup_steps",
        "balance",
    }


@pytest.mark.parametrize("factory", [omgd_jax.lisa, omgd_jax.lisa_wor])
def test_inject_hyperparams_changes_the_learning_rate(factory):
    params = stacked_tree(num_layers=4)
    make = optax.inject_hyperparams(factory, static_args=omgd_jax.static_args(factory))
    tx = make(0.1, layers=LAYERS, layers_per_phase=2, steps_per_mask=3, weight_decay=0.0)
    state = tx.init(params)
    g = random_tree(params, 0)
    u1, _ = tx.update(g, state, params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.3)
    u2, _ = tx.update(g, state, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, 3 * a, rtol=1e-6), u1, u2)


def test_optax_citizenship():
    params = stacked_tree(num_layers=4)
    kw = dict(layers=LAYERS, layers_per_phase=2, steps_per_mask=2)
    tx = optax.chain(optax.clip_by_global_norm(1.0), omgd_jax.lisa(0.1, **kw))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    spec = lambda s: jax.tree.map(lambda a: (a.shape, a.dtype), s)
    state = tx.init(params)
    assert spec(tx.init(abstract)) == spec(state) == spec(jax.eval_shape(tx.init, abstract))
    traces = []

    @jax.jit
    def step(s, g):
        traces.append(1)
        return tx.update(g, s, params)

    for t in range(5):
        _, new = step(state, random_tree(params, t))
        assert spec(new) == spec(state)
        state = new
    assert len(traces) == 1
    multi = optax.MultiSteps(omgd_jax.lisa(0.1, **kw), every_k_schedule=3)
    ms, multi_update = multi.init(params), jax.jit(multi.update)
    for t in range(6):
        _, ms = multi_update(random_tree(params, t), ms, params)
    assert int(optax.tree.get(ms, "omgd_step")) == 2  # optimizer steps, not micro-batches
