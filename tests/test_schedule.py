"""The mask schedule: coverage per cycle, values, keys, warm-up, layers (omgd_jax.schedule)."""

import dataclasses
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import omgd_jax
from omgd_jax._src.schedule import MaskSchedule
from tests.conftest import masks_over, stacked_tree, tree_sum

shapes = st.lists(
    st.lists(st.integers(1, 6), min_size=0, max_size=3).map(tuple), min_size=1, max_size=5
)


def make_tree(shape_list):
    return {f"p{i}": jnp.ones(s) for i, s in enumerate(shape_list)}


@settings(max_examples=25, deadline=None)
@given(
    shape_list=shapes,
    num_masks=st.integers(1, 5),
    steps=st.integers(1, 3),
    granularity=st.sampled_from(["element", "tensor"]),
    layout=st.sampled_from(["contiguous", "strided", "random"]),
    balance=st.sampled_from(["count", "size"]),
    seed=st.integers(0, 2**16),
)
def test_wor_masks_cover_every_coordinate_once_per_cycle(
    shape_list, num_masks, steps, granularity, layout, balance, seed
):
    tree = make_tree(shape_list)
    kw = {"layout": layout} if granularity == "element" else {"balance": balance}
    tx = omgd_jax.omgd_mask(num_masks, steps, key=seed, granularity=granularity, **kw)
    cycle = steps * num_masks
    masks = masks_over(tx, tree, 2 * cycle)
    for c in range(2):  # two cycles: the second has a fresh partition
        total = tree_sum(masks[c * cycle : (c + 1) * cycle])
        for leaf in jax.tree.leaves(total):
            np.testing.assert_array_equal(leaf, steps * num_masks)
    for m in masks:  # every kept entry is M, the rest 0
        values = np.concatenate([np.ravel(x) for x in jax.tree.leaves(m)])
        assert set(np.unique(values)) <= {0.0, float(num_masks)}


@settings(max_examples=10, deadline=None)
@given(gamma=st.integers(1, 3), num_masks=st.integers(1, 4), seed=st.integers(0, 999))
def test_layer_wor_activates_every_layer_once_per_cycle(gamma, num_masks, seed):
    tree = stacked_tree(num_layers=gamma * num_masks)
    tx = omgd_jax.omgd_mask(
        steps_per_mask=2, key=seed, granularity="layer", layers=r"^blocks/", layers_per_phase=gamma
    )
    masks = masks_over(tx, tree, 2 * num_masks)
    for m in masks[::2]:  # each phase: exactly gamma layers, scaled by N_L / gamma = M
        per_layer = np.asarray(m["blocks"]["ln"]["scale"][:, 0])
        assert (
            sorted(per_layer.tolist())
            == [0.0] * (gamma * num_masks - gamma) + [float(num_masks)] * gamma
        )
        np.testing.assert_array_equal(m["wte"], 1.0)  # always active, scale 1
        np.testing.assert_array_equal(m["ln_f"], 1.0)
    total = tree_sum(masks)
    np.testing.assert_array_equal(total["blocks"]["attn"]["kernel"], 2 * num_masks)
    np.testing.assert_array_equal(total["wte"], 2 * num_masks)


def activity(schedule, tree, key, steps):
    """bool[steps, n]: which coordinates of the single leaf of ``tree`` are active per step."""
    plan, leaves = schedule.plan(tree), jax.tree.leaves(tree)
    one = lambda step: (schedule.factors(plan, leaves, key, step)[0] > 0).reshape(-1)
    return np.asarray(jax.jit(jax.vmap(one))(jnp.arange(steps)))


@pytest.mark.parametrize("traversal", ["wor", "iid"])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "random"])
def test_every_coordinate_is_active_with_probability_one_over_m(traversal, layout):
    num_masks, phases = 4, 1000
    schedule = MaskSchedule(num_masks, traversal=traversal, layout=layout)
    on = activity(schedule, {"w": jnp.ones(64)}, jax.random.key(0), phases)
    per_coordinate = on.mean(axis=0)
    if traversal == "wor":  # exactly once per cycle of M phases
        np.testing.assert_array_equal(per_coordinate, 1 / num_masks)
    else:
        # 1000 Bernoulli(1/4) draws per coordinate: standard deviation 0.014; 0.07 is 5 sd.
        np.testing.assert_allclose(per_coordinate, 1 / num_masks, atol=0.07)
        # All 64000 draws: the mean within 0.01 of 1/4 (the draws of one phase are dependent
        # through the shared label, so allow several times the iid standard deviation 0.002).
        assert abs(on.mean() - 1 / num_masks) < 0.01


def test_iid_labels_are_uniform_and_a_cycle_can_repeat_one():
    num_masks, phases = 4, 4000
    tree = {"w": jnp.ones(8)}
    labels = {}
    for traversal in ("wor", "iid"):
        schedule = MaskSchedule(num_masks, traversal=traversal)
        plan = schedule.plan(tree)
        label = lambda step, s=schedule, p=plan: s.active(p, jax.random.key(1), step).label
        labels[traversal] = np.asarray(jax.jit(jax.vmap(label))(jnp.arange(phases)))
    cycles = {t: x.reshape(-1, num_masks) for t, x in labels.items()}
    assert all(sorted(c) == list(range(num_masks)) for c in cycles["wor"].tolist())
    repeats = [len(set(c)) < num_masks for c in cycles["iid"].tolist()]
    # P(a cycle of 4 iid labels has a repeat) = 1 - 4!/4^4 = 0.906.
    assert 0.85 < np.mean(repeats) < 0.95
    freq = np.bincount(labels["iid"], minlength=num_masks) / phases
    np.testing.assert_allclose(freq, 1 / num_masks, atol=0.03)  # sd 0.007: 4 sd


def test_iid_layers_are_active_with_probability_gamma_over_n():
    schedule = MaskSchedule(
        granularity="layer", traversal="iid", layers=r"^blocks/", layers_per_phase=2
    )
    plan = schedule.plan(stacked_tree(num_layers=8))
    ids = jax.jit(jax.vmap(lambda step: schedule.active(plan, jax.random.key(2), step).layer_ids))
    layer_ids = np.asarray(ids(jnp.arange(2000)))
    assert all(len(set(row)) == 2 for row in layer_ids.tolist())  # gamma distinct layers
    freq = np.bincount(layer_ids.ravel(), minlength=8) / 2000
    np.testing.assert_allclose(freq, 2 / 8, atol=0.04)  # sd 0.0097: 4 sd


def test_iid_masks_do_not_cover_every_coordinate_per_cycle():
    tree = {"w": jnp.ones((4,))}
    tx = omgd_jax.omgd_mask(2, 1, key=0, granularity="element", traversal="iid", layout="random")
    masks = masks_over(tx, tree, 40)
    pairs = [tree_sum(masks[i : i + 2])["w"] for i in range(0, 40, 2)]
    assert any(not np.all(np.asarray(p) == 2.0) for p in pairs)  # no per-cycle coverage
    for m in masks:
        assert set(np.unique(np.asarray(m["w"]))) <= {0.0, 2.0}


def test_lisa_is_layer_iid_without_scale():
    tree = stacked_tree(num_layers=6)
    tx = omgd_jax.omgd_mask(
        key=3,
        granularity="layer",
        traversal="iid",
        scale=False,
        layers=r"^blocks/",
        layers_per_phase=2,
    )
    masks = masks_over(tx, tree, 30)
    active = [np.flatnonzero(np.asarray(m["blocks"]["ln"]["scale"][:, 0])) for m in masks]
    assert all(len(a) == 2 for a in active)
    assert all(set(np.unique(np.asarray(m["blocks"]["ln"]["scale"]))) <= {0.0, 1.0} for m in masks)
    # With replacement across phases: some cycle of 3 phases misses a layer.
    cycles = [set(np.concatenate(active[i : i + 3]).tolist()) for i in range(0, 30, 3)]
    assert any(len(c) < 6 for c in cycles)


def test_same_key_same_masks_other_key_other_masks():
    tree = {"a": jnp.ones((5, 3)), "b": jnp.ones((7,)), "c": jnp.ones((2, 2))}

    def run(key):
        return masks_over(omgd_jax.omgd_mask(3, 1, key=key, layout="random"), tree, 6)

    same = jax.tree.map(np.array_equal, run(1), run(1))
    assert all(jax.tree.leaves(same))
    other = jax.tree.map(np.array_equal, run(1), run(2))
    assert not all(jax.tree.leaves(other))
    typed = jax.tree.map(np.array_equal, run(1), run(jax.random.key(1)))
    assert all(jax.tree.leaves(typed))


def test_contiguous_order_is_redrawn_every_cycle():
    tree = {"w": jnp.ones((12,))}
    masks = masks_over(omgd_jax.omgd_mask(4, 1, key=0), tree, 4 * 8)
    orders = {
        tuple(int(np.flatnonzero(np.asarray(masks[4 * c + j]["w"]))[0]) // 3 for j in range(4))
        for c in range(8)
    }
    assert len(orders) > 1


def test_repartition_false_keeps_the_partition():
    tree = {f"p{i}": jnp.ones(()) for i in range(8)}
    tx = omgd_jax.omgd_mask(2, 1, key=5, granularity="tensor", repartition=False)
    masks = masks_over(tx, tree, 12)
    groups = {frozenset(k for k, v in m.items() if v > 0) for m in masks}
    assert len(groups) == 2  # the same two halves, cycle after cycle
    tx = omgd_jax.omgd_mask(2, 1, key=5, granularity="tensor")
    groups = {frozenset(k for k, v in m.items() if v > 0) for m in masks_over(tx, tree, 12)}
    assert len(groups) > 2


def test_warmup_steps_are_full_and_unscaled():
    tree = {"w": jnp.ones((6,))}
    masks = masks_over(omgd_jax.omgd_mask(3, 2, warmup_steps=6), tree, 12)
    for m in masks[:6]:
        np.testing.assert_array_equal(m["w"], 1.0)
    np.testing.assert_array_equal(tree_sum(masks[6:12])["w"], 6.0)  # cycle 1, whole


def test_phases_stay_aligned_with_step_zero_after_a_warmup():
    # Holds of K = 4 steps start at multiples of 4 whatever the warm-up (SPEC: masks[t // n]).
    tree = {"w": jnp.ones((8,))}
    masks = masks_over(omgd_jax.omgd_mask(2, 4, warmup_steps=3, layout="random"), tree, 16)
    same = [bool(np.array_equal(masks[t]["w"], masks[t + 1]["w"])) for t in range(3, 15)]
    assert same == [t % 4 != 3 for t in range(3, 15)]


def test_mask_index_selects_the_mask_of_the_cycle():
    tree = {"w": jnp.ones((8,))}
    tx = omgd_jax.omgd_mask(4, 3, key=0)
    state = tx.init(tree)
    ones = {"w": jnp.ones(8)}
    seen = []
    for j in [2, 0, 3, 1]:  # any order within the cycle
        u, state = tx.update(ones, state, tree, mask_index=j)
        seen.append(np.asarray(u["w"]))
    np.testing.assert_array_equal(sum(seen), 4.0)
    u, _ = tx.update(ones, tx.init(tree), tree, mask_index=2)
    np.testing.assert_array_equal(u["w"], seen[0])  # mask 2 of cycle 0, whatever the step


def test_size_balance_splits_elements_evenly():
    tree = {"big": jnp.ones((100,)), **{f"s{i}": jnp.ones((10,)) for i in range(10)}}
    tx = omgd_jax.omgd_mask(2, 1, key=0, granularity="tensor", balance="size", scale=False)
    for m in masks_over(tx, tree, 6):
        kept = sum(int(np.sum(x)) for x in jax.tree.leaves(m))
        assert 50 <= kept <= 150  # count balance would often give 100 +- 90


def test_unrolled_layers_by_capture_group():
    tree = {"emb": jnp.ones(3), **{f"h_{i}": {"w": jnp.ones((2, 2))} for i in range(4)}}
    tx = omgd_jax.omgd_mask(2, 1, granularity="layer", layers=r"^h_(\d+)/")
    masks = masks_over(tx, tree, 2)
    for m in masks:
        assert sum(float(m[f"h_{i}"]["w"][0, 0]) > 0 for i in range(4)) == 2
    total = tree_sum(masks)
    for i in range(4):
        np.testing.assert_array_equal(total[f"h_{i}"]["w"], 2.0)
    np.testing.assert_array_equal(total["emb"], 2.0)


def test_non_float_leaves_pass_through():
    tree = {"w": jnp.ones(4), "count": jnp.arange(3)}
    grads = {"w": jnp.ones(4), "count": jnp.array([5, 6, 7])}
    tx = omgd_jax.omgd_mask(2, 1)
    u, _ = tx.update(grads, tx.init(tree), tree)
    np.testing.assert_array_equal(u["count"], [5, 6, 7])
    assert u["count"].dtype == grads["count"].dtype


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_masks=0), "num_masks must be >= 1"),
        (dict(num_masks=2, steps_per_mask=0), "steps_per_mask must be >= 1"),
        (dict(num_masks=2.0), "num_masks must be an int"),
        (dict(num_masks=2, granularity="row"), "granularity must be one of"),
        (dict(num_masks=2, traversal="random"), "traversal must be one of"),
        (dict(num_masks=2, layout="banded"), "layout must be one of"),
        (dict(num_masks=2, balance="bytes"), "balance must be one of"),
        (dict(num_masks=2, warmup_steps=-1), "warmup_steps must be >= 0"),
        (dict(num_masks=2, granularity="layer"), "needs layers="),
        (dict(num_masks=2, layers="x"), "only used with granularity='layer'"),
        (dict(num_masks=2, key="seed"), "key must be an int seed"),
        (dict(), "num_masks is required"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        omgd_jax.omgd_mask(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layers_per_phase=5), "larger than the number of layers"),
        (dict(layers_per_phase=3), "must divide the number of layers"),
        (dict(num_masks=8), "larger than the number of layers"),
    ],
)
def test_layer_count_checks_when_the_tree_is_seen(kwargs, match):
    tx = omgd_jax.omgd_mask(granularity="layer", layers=r"^blocks/", **kwargs)
    tree = stacked_tree(num_layers=4)
    with pytest.raises(ValueError, match=match):
        tx.update(tree, tx.init(tree), tree)


def test_layers_that_select_nothing_are_an_error():
    tx = omgd_jax.omgd_mask(2, granularity="layer", layers=r"^decoder/")
    tree = stacked_tree()
    with pytest.raises(ValueError, match="selects no floating-point leaf"):
        tx.update(tree, tx.init(tree), tree)


# ------------------------------------------------------------------ MaskSchedule, its errors
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(num_masks=True), TypeError, "num_masks must be an int >= 1, got True"),
        (dict(num_masks=0), ValueError, "num_masks must be >= 1, got 0"),
        (dict(num_masks=2, steps_per_mask=1.5), TypeError, "steps_per_mask must be an int >= 1"),
        (dict(num_masks=2, steps_per_mask=0), ValueError, "steps_per_mask must be >= 1, got 0"),
        (dict(num_masks=2, warmup_steps=-1), ValueError, "warmup_steps must be >= 0, got -1"),
        (
            dict(num_masks=2, granularity="row"),
            ValueError,
            "granularity must be one of ('element', 'tensor', 'layer'), got 'row'",
        ),
        (
            dict(num_masks=2, traversal="random"),
            ValueError,
            "traversal must be one of ('wor', 'iid'), got 'random'",
        ),
        (
            dict(num_masks=2, layout="banded"),
            ValueError,
            "layout must be one of ('contiguous', 'strided', 'random'), got 'banded'",
        ),
        (
            dict(num_masks=2, balance="bytes"),
            ValueError,
            "balance must be one of ('count', 'size'), got 'bytes'",
        ),
        (dict(num_masks=2, scale=1), TypeError, "scale must be a bool, got 1"),
        (dict(num_masks=2, repartition="yes"), TypeError, "repartition must be a bool, got 'yes'"),
        (
            dict(layers_per_phase=2),
            ValueError,
            "layers_per_phase is only used with granularity='layer'",
        ),
        (
            dict(granularity="layer", layers="x", layers_per_phase=0),
            ValueError,
            "layers_per_phase must be >= 1, got 0",
        ),
        (
            dict(),
            ValueError,
            "num_masks is required (an int >= 1); with granularity='layer' you may give "
            "layers_per_phase instead",
        ),
        (dict(num_masks=2, granularity="layer"), ValueError, "granularity='layer' needs layers="),
        (
            dict(num_masks=2, granularity="layer", layers=3),
            TypeError,
            "layers must be a regex string or a callable, got 3",
        ),
        (
            dict(num_masks=2, granularity="layer", layers="x", layers_per_phase=1),
            ValueError,
            "give num_masks or layers_per_phase for granularity='layer', not both",
        ),
        (
            dict(num_masks=2, layers="x"),
            ValueError,
            "layers= is only used with granularity='layer'",
        ),
    ],
)
def test_every_error_of_mask_schedule(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        MaskSchedule(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers_per_phase=5), "layers_per_phase=5 is larger than the number of layers (4)"),
        (dict(layers_per_phase=3), "layers_per_phase=3 must divide the number of layers (4)"),
        (dict(num_masks=8), "num_masks=8 is larger than the number of layers (4)"),
        (
            dict(num_masks=3),
            "num_masks=3 must divide the number of layers (4) so that every phase trains the "
            "same number of layers",
        ),
    ],
)
def test_every_error_of_the_layer_count(kwargs, message):
    schedule = MaskSchedule(granularity="layer", layers=r"^blocks/", **kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        schedule.plan(stacked_tree(num_layers=4))


def test_mask_index_with_iid_is_an_error():
    schedule = MaskSchedule(2, traversal="iid")
    with pytest.raises(ValueError, match=re.escape("mask_index is only meaningful with")):
        schedule.phase(jnp.int32(0), 2, mask_index=jnp.int32(1))
    tx = omgd_jax.omgd_mask(2, traversal="iid")
    params = {"w": jnp.ones(4)}
    with pytest.raises(ValueError, match="traversal='wor'"):
        tx.update(params, tx.init(params), params, mask_index=1)


@pytest.mark.parametrize("factory", [omgd_jax.omgd_mask, omgd_jax.omgd, omgd_jax.omgd_adamw])
def test_factories_take_the_schedule_fields_with_its_names_types_and_defaults(factory):
    parameters = inspect.signature(factory).parameters
    for field in dataclasses.fields(MaskSchedule):
        assert field.name in parameters, field.name
        assert parameters[field.name].default == field.default, field.name
        assert parameters[field.name].annotation == field.type, field.name


def test_from_args_picks_the_fields_by_name():
    args = {f.name: f.default for f in dataclasses.fields(MaskSchedule)}
    args.update(num_masks=3, layout="random", learning_rate=0.1, state="frozen")
    assert MaskSchedule.from_args(args) == MaskSchedule(num_masks=3, layout="random")


def test_active_layer_ids_are_the_layers_omgd_mask_trains():
    kwargs = dict(steps_per_mask=2, granularity="layer", layers=r"^blocks/", layers_per_phase=2)
    tree = stacked_tree(num_layers=6)
    schedule = MaskSchedule(**kwargs)
    plan = schedule.plan(tree)
    masks = masks_over(omgd_jax.omgd_mask(key=4, **kwargs), tree, 12)
    ids_at = jax.jit(lambda step: schedule.active(plan, jax.random.key(4), step).layer_ids)
    for step, m in enumerate(masks):
        trained = np.flatnonzero(np.asarray(m["blocks"]["ln"]["scale"][:, 0]))
        assert sorted(np.asarray(ids_at(step)).tolist()) == trained.tolist()
    active = schedule.active(plan, jax.random.key(4), jnp.int32(0))
    assert (active.num_masks, active.factor) == (3, 3.0)
    unscaled = dataclasses.replace(schedule, scale=False).active(plan, jax.random.key(4), 0)
    assert unscaled.factor == 1.0


def test_active_label_is_the_band_that_omgd_mask_keeps():
    tree = {"w": jnp.ones(12)}
    schedule = MaskSchedule(4, 1)
    plan = schedule.plan(tree)
    masks = masks_over(omgd_jax.omgd_mask(4, 1, key=9), tree, 8)
    for step, m in enumerate(masks):
        active = schedule.active(plan, jax.random.key(9), step)
        assert active.layer_ids is None
        start = 3 * int(active.label)  # bands of c = 12 / 4 = 3 coordinates
        assert np.flatnonzero(np.asarray(m["w"])).tolist() == [start, start + 1, start + 2]
