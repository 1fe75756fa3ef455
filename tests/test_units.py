"""Units beyond the layers (issue 19): extra traversal units (``units=``) and never-trained
leaves (``frozen=``) in the layer-wise schedule, the dense masks, the compact and frozen states."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import omgd_jax
from omgd_jax._src import layers as layers_lib
from omgd_jax._src import unit_slot
from omgd_jax._src.schedule import MaskSchedule
from tests.conftest import random_tree, stacked_tree

LAYERS, UNITS = r"^blocks/", r"^(wte|head)$"


def unit_tree(num_layers=4):
    """stacked_tree plus a head: wte and head are the extra units, ln_f always active."""
    tree = stacked_tree(num_layers=num_layers)
    tree["head"] = jnp.ones((3, 2))
    return tree


KW = dict(granularity="layer", layers=LAYERS, layers_per_phase=2, units=UNITS)


def moved(before, after):
    """Which units moved: 'wte', 'head', 'ln_f' and ('layer', i) for every stacked layer."""
    out = {k for k in ("wte", "head", "ln_f") if not np.array_equal(before[k], after[k])}
    rows = np.asarray(before["blocks"]["attn"]["kernel"] != after["blocks"]["attn"]["kernel"])
    out |= {("layer", int(i)) for i in np.flatnonzero(rows.reshape(rows.shape[0], -1).any(1))}
    return out


# ------------------------------------------------------------------------------- coverage
def test_a_cycle_scales_every_layer_and_unit_by_m_exactly_once_hand_checked():
    """N_L = 4, gamma = 2, E = 2 (wte, head): M = 4 phases; ln_f always 1; frozen ln_f 0."""
    tree = unit_tree()
    tx = omgd_jax.omgd_mask(steps_per_mask=1, key=3, **KW)
    state, ones = tx.init(tree), jax.tree.map(jnp.ones_like, tree)
    factors = []
    for _ in range(4):
        u, state = tx.update(ones, state)
        factors.append(u)
    total = jax.tree.map(lambda *xs: sum(xs), *factors)
    for leaf in jax.tree.leaves({k: total[k] for k in ("wte", "head", "blocks")}):
        np.testing.assert_array_equal(leaf, 4.0)  # sum_j S^(j) = M * 1
    for f in factors:  # every phase: one unit or two layers at M, the rest 0; ln_f at 1
        np.testing.assert_array_equal(f["ln_f"], 1.0)
        values = {float(np.max(f[k])) for k in ("wte", "head")}
        layers = np.asarray(f["blocks"]["ln"]["scale"][:, 0])
        assert set(np.unique(layers)) | values <= {0.0, 4.0}
        units_on = sum(float(np.max(f[k])) == 4 for k in ("wte", "head"))
        assert int((layers == 4).sum()) + 2 * units_on == 2  # gamma layers, or one unit
    frozen = omgd_jax.omgd_mask(steps_per_mask=1, frozen="ln_f", warmup_steps=2, **KW)
    state = frozen.init(tree)
    for _ in range(6):  # warm-up included: a frozen leaf never gets a gradient
        u, state = frozen.update(ones, state)
        np.testing.assert_array_equal(u["ln_f"], 0.0)


def test_a_capture_group_makes_one_unit_of_several_leaves():
    tree = {"emb": {"tok": jnp.ones((5, 2)), "pos": jnp.ones((3, 2))}, "blocks": jnp.ones((2, 2))}
    schedule = MaskSchedule(
        granularity="layer", layers=LAYERS[:-1], layers_per_phase=1, units=r"^(emb)/"
    )
    plan = schedule.plan(tree)
    assert plan.extra_names == ("emb",) and schedule.masks_for(plan) == 3
    tx = omgd_jax.omgd_mask(
        steps_per_mask=1,
        granularity="layer",
        layers="^blocks",
        layers_per_phase=1,
        units=r"^(emb)/",
    )
    state, ones = tx.init(tree), jax.tree.map(jnp.ones_like, tree)
    for _ in range(3):
        u, state = tx.update(ones, state)
        assert float(u["emb"]["tok"].max()) == float(u["emb"]["pos"].max())  # together
    named = layers_lib.plan_layers(tree, "^blocks", lambda p, x: "E" if "emb" in p else None)
    assert named.extra_names == ("E",) and named.num_extra == 1


@settings(max_examples=20, deadline=None)
@given(
    num_layers=st.integers(1, 8),
    gamma_index=st.integers(0, 7),
    num_extra=st.integers(0, 3),
    seed=st.integers(0, 2**16),
    repartition=st.sampled_from([None, False]),
)
def test_every_cycle_visits_every_layer_and_every_unit_exactly_once(
    num_layers, gamma_index, num_extra, seed, repartition
):
    divisors = [g for g in range(1, num_layers + 1) if num_layers % g == 0]
    gamma = divisors[gamma_index % len(divisors)]
    tree = {"blocks": jnp.ones((num_layers, 2))} | {f"u{e}": jnp.ones(3) for e in range(num_extra)}
    schedule = MaskSchedule(
        granularity="layer",
        layers="^blocks",
        layers_per_phase=gamma,
        units=r"^u\d" if num_extra else None,
        repartition=repartition,
    )
    plan = schedule.plan(tree)
    groups = num_layers // gamma
    m = schedule.masks_for(plan)
    assert m == groups + num_extra and plan.num_extra == num_extra
    steps = jnp.arange(2 * m, dtype=jnp.int32)  # two cycles, K = 1
    active = jax.vmap(lambda s: schedule.active(plan, jax.random.key(seed), s))(steps)
    units, ids = np.asarray(active.unit), np.asarray(active.layer_ids)
    for c in range(2):
        u, i = units[c * m : (c + 1) * m], ids[c * m : (c + 1) * m]
        assert sorted(u[u >= 0].tolist()) == list(range(num_extra))  # each unit once
        assert sorted(i[u < 0].ravel().tolist()) == list(range(num_layers))  # each layer once
        assert (u < 0).sum() == groups
        # the ids of a unit phase are gamma valid layers (shape-stable), not trained
        assert ((i >= 0) & (i < num_layers)).all()
    assert schedule.active(plan, jax.random.key(seed), jnp.int32(0)).factor == float(m)


def test_iid_draws_follow_the_law_without_coverage():
    """Every phase draws one of the M labels uniformly: each layer and each unit is active
    with probability 1/M, independently, so some windows of M phases miss a unit."""
    tree = unit_tree()
    schedule = MaskSchedule(traversal="iid", **KW)
    plan = schedule.plan(tree)
    m, n = schedule.masks_for(plan), 4000
    active = jax.jit(jax.vmap(lambda s: schedule.active(plan, jax.random.key(0), s)))(
        jnp.arange(n, dtype=jnp.int32)
    )
    units, ids = np.asarray(active.unit), np.asarray(active.layer_ids)
    tol = 4 * math.sqrt(0.25 * 0.75 / n)
    for e in range(2):
        assert abs(np.mean(units == e) - 1 / m) < tol
    for layer in range(4):
        assert abs(np.mean((units < 0) & (ids == layer).any(1)) - 1 / m) < tol
    windows = units[: n - n % m].reshape(-1, m)
    assert any(not {0, 1} <= set(w.tolist()) for w in windows)  # no coverage guarantee
    assert (
        len({(u, tuple(sorted(i))) for u, i in zip(units, ids.tolist(), strict=True) if u < 0}) == 6
    )


# ----------------------------------------------------------------- parameters, three states
TXS = {
    "compact": lambda **kw: omgd_jax.omgd_adamw(0.05, weight_decay=0.1, **kw),
    "frozen": lambda **kw: omgd_jax.omgd_adamw(0.05, weight_decay=0.1, state="frozen", **kw),
    "dense": lambda **kw: optax.chain(omgd_jax.omgd_mask(**kw), optax.sgd(0.05)),
}


@pytest.mark.parametrize("kind", sorted(TXS))
def test_frozen_leaves_never_move_and_every_unit_moves_in_exactly_one_phase(kind):
    tree = unit_tree()
    tree["wpe"] = jnp.ones((2, 3))
    tx = TXS[kind](steps_per_mask=2, frozen="^wpe$", key=5, **KW)
    params = random_tree(tree, 0)
    state, update = tx.init(params), jax.jit(tx.update)
    first = params["wpe"]
    for cycle in range(2):
        phases = []
        for phase in range(4):  # M = 2 layer groups + 2 units
            start = params
            for k in range(2):
                grads = random_tree(tree, 100 * cycle + 10 * phase + k)
                u, state = update(grads, state, params)
                np.testing.assert_array_equal(u["wpe"], 0.0)
                params = optax.apply_updates(params, u)
            changed = moved(start, params)
            assert "ln_f" in changed  # always active
            phases.append(changed - {"ln_f"})
        for unit in ["wte", "head"] + [("layer", i) for i in range(4)]:
            assert sum(unit in p for p in phases) == 1, (unit, phases)
        assert sorted(len(p) for p in phases) == [1, 1, 2, 2]  # two units, two layer pairs
    np.testing.assert_array_equal(params["wpe"], first)


def test_frozen_leaves_have_no_optimizer_state():
    tree = unit_tree()
    tree["wpe"] = jnp.ones((5, 7))  # a shape no other leaf has
    for state_kind in ("compact", "frozen"):
        tx = omgd_jax.omgd_adamw(0.1, state=state_kind, frozen="^wpe$", **KW)
        shapes = {x.shape for x in jax.tree.leaves(jax.eval_shape(tx.init, tree))}
        assert (5, 7) not in shapes, state_kind


def quadratic_grads(params, t):
    """A gradient that depends on the parameters, so trajectories diverge if updates differ."""
    noise = random_tree(params, t)
    return jax.tree.map(lambda p, n: 0.5 * p + n, params, noise)


def test_compact_equals_dense_and_frozen_with_sgd():
    tree = unit_tree()
    kw = dict(steps_per_mask=2, key=7, **KW)
    txs = [
        optax.chain(omgd_jax.omgd_mask(**kw), optax.sgd(0.1)),
        omgd_jax.omgd(optax.sgd(0.1), **kw),
        omgd_jax.omgd(optax.sgd(0.1), state="frozen", **kw),
    ]
    runs = []
    for tx in txs:
        params, state, update = random_tree(tree, 1), tx.init(tree), jax.jit(tx.update)
        for t in range(16):  # two cycles
            u, state = update(quadratic_grads(params, t), state, params)
            params = optax.apply_updates(params, u)
        runs.append(params)
    for other in runs[1:]:
        for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(other), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_compact_adam_restarts_a_units_moments_when_it_comes_back_as_a_layers_do():
    """Against a hand-written LISA/BAdam reference on unrolled layers: every phase a fresh Adam
    on the active unit (gradient times M), one persistent Adam on the always-active leaves."""
    tree = {f"h_{i}": {"w": jnp.ones((2, 3))} for i in range(4)}
    tree |= {"wte": jnp.ones((5, 3)), "head": jnp.ones(3), "ln_f": jnp.ones(3)}
    kw = dict(granularity="layer", layers=r"^h_(\d+)/", layers_per_phase=2, units=UNITS)
    schedule = MaskSchedule(steps_per_mask=3, **kw)
    tx = omgd_jax.omgd(optax.adam(0.1), steps_per_mask=3, key=2, **kw)
    params = random_tree(tree, 3)
    state, update = tx.init(params), jax.jit(tx.update)
    plan = schedule.plan(params)
    adam = optax.adam(0.1)
    always = lambda t: {"ln_f": t["ln_f"]}
    ref_always, ref_phase, phase_of = adam.init(always(params)), None, None
    ref = params
    for t in range(3 * 4 * 2):
        active = schedule.active(plan, jax.random.key(2), jnp.int32(t))
        unit = int(active.unit)
        names = (
            [plan.extra_names[unit]]
            if unit >= 0
            else [f"h_{int(i)}" for i in np.asarray(active.layer_ids)]
        )
        grads = quadratic_grads(ref, t)
        if int(active.phase.phase_id) != phase_of:  # a new phase: the active unit restarts
            phase_of = int(active.phase.phase_id)
            ref_phase = adam.init({k: ref[k] for k in names})
        scaled = {k: jax.tree.map(lambda g: 4.0 * g, grads[k]) for k in names}  # times M
        u_act, ref_phase = adam.update(scaled, ref_phase)
        u_alw, ref_always = adam.update(always(grads), ref_always)
        ref_u = jax.tree.map(jnp.zeros_like, ref) | u_act | u_alw
        ref = optax.apply_updates(ref, ref_u)
        u, state = update(quadratic_grads(params, t), state, params)
        params = optax.apply_updates(params, u)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        if unit >= 0:  # the unit's Adam, read out of the shared slot, restarted every phase
            layout = unit_slot.slot_layout(adam.init, [
                {k: params[k] if k == name else optax.MaskedNode() for k in params}
                for name in plan.extra_names
            ])  # fmt: skip
            mine = unit_slot.read_unit(layout, state.omgd_unit_state, unit)
            assert int(mine[0].count) == (t % 3) + 1
            got, want = jax.tree.leaves(mine[0].mu), jax.tree.leaves(ref_phase[0].mu)
            for a, b in zip(got, want, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- jit, shapes, optax, state
@pytest.mark.parametrize("kind", sorted(TXS))
def test_one_compilation_serves_every_phase(kind):
    tree = unit_tree()
    tx = TXS[kind](steps_per_mask=1, frozen="ln_f", **KW)
    traces = []

    @jax.jit
    def step(params, state, t):
        traces.append(1)
        u, state = tx.update(jax.tree.map(lambda p: p * t, params), state, params)
        return optax.apply_updates(params, u), state

    params, state = tree, tx.init(tree)
    units = set()
    for t in range(8):
        if kind != "dense":
            units.add(int(optax.tree.get(state, "omgd_unit")))
        params, state = step(params, state, jnp.float32(t))
    assert len(traces) == 1
    assert kind == "dense" or units == {-1, 0, 1}


@pytest.mark.parametrize("state_kind", ["compact", "frozen"])
def test_init_on_shape_dtype_structs(state_kind):
    tree = unit_tree()
    tx = omgd_jax.omgd_adamw(0.1, state=state_kind, frozen="ln_f", **KW)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    from_shapes, real = tx.init(shapes), tx.init(tree)
    assert jax.tree.structure(from_shapes) == jax.tree.structure(real)
    shape_of = lambda t: [x.shape for x in jax.tree.leaves(t)]
    assert shape_of(from_shapes) == shape_of(real)
    assert shape_of(jax.eval_shape(tx.init, shapes)) == shape_of(real)
    u, _ = jax.jit(tx.update)(tree, from_shapes, tree)
    assert jax.tree.structure(u) == jax.tree.structure(tree)


def test_chain_inject_hyperparams_and_multisteps():
    tree = unit_tree()
    kw = dict(steps_per_mask=1, key=1, frozen="ln_f", **KW)
    plain = omgd_jax.omgd_adamw(0.1, **kw)
    injected = optax.inject_hyperparams(
        omgd_jax.omgd_adamw, static_args=omgd_jax.static_args(omgd_jax.omgd_adamw)
    )(learning_rate=0.1, **kw)
    chained = optax.chain(optax.clip_by_global_norm(1e9), plain)
    results = []
    for tx in (plain, injected, chained):
        params, state = random_tree(tree, 4), tx.init(tree)
        for t in range(4):
            u, state = jax.jit(tx.update)(quadratic_grads(params, t), state, params)
            params = optax.apply_updates(params, u)
        results.append(params)
    for other in results[1:]:
        for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(other), strict=True):
            # inject_hyperparams makes b1, b2, eps float32 arrays: last-bit differences
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    multi = optax.MultiSteps(plain, every_k_schedule=2)
    params, state = random_tree(tree, 4), multi.init(tree)
    units = []
    for t in range(8):  # 8 micro-batches = 4 optimizer steps = one cycle
        units.append(int(optax.tree.get(state.inner_opt_state, "omgd_unit")))
        u, state = jax.jit(multi.update)(quadratic_grads(params, t), state, params)
        params = optax.apply_updates(params, u)
    assert units[::2] == units[1::2]  # micro-batches do not advance the phase
    assert sorted(units[::2]) == [-1, -1, 0, 1]  # optimizer steps do: one cycle


def save(state):
    """A checkpoint: every leaf copied to host memory (typed keys as their key data)."""
    leaves, treedef = jax.tree.flatten(state)
    is_key = [jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) for x in leaves]
    data = [
        np.array(jax.random.key_data(x) if k else x) for x, k in zip(leaves, is_key, strict=True)
    ]
    return treedef, data, is_key


def restore(checkpoint):
    treedef, data, is_key = checkpoint
    leaves = [
        jax.random.wrap_key_data(jnp.asarray(d)) if k else jnp.asarray(d)
        for d, k in zip(data, is_key, strict=True)
    ]
    return jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize("state_kind", ["compact", "frozen"])
def test_a_traversal_with_units_resumes_bit_exact_mid_phase(state_kind):
    tree = unit_tree()
    tx = omgd_jax.omgd_adamw(0.1, state=state_kind, steps_per_mask=2, key=9, **KW)
    update = jax.jit(tx.update)

    def run(params, state, steps):
        for t in steps:
            u, state = update(quadratic_grads(params, t), state, params)
            params = optax.apply_updates(params, u)
        return params, state

    start = random_tree(tree, 5)
    straight = run(start, tx.init(tree), range(11))
    params, state = run(start, tx.init(tree), range(3))  # step 3: the middle of phase 1
    checkpoint = save((params, state))
    del params, state
    resumed = run(*restore(checkpoint), range(3, 11))
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("state_kind", ["compact", "frozen"])
def test_a_state_written_without_units_is_refused_and_the_converse(state_kind):
    tree = unit_tree()
    base = dict(granularity="layer", layers=LAYERS, layers_per_phase=2, state=state_kind)
    without = omgd_jax.omgd_adamw(0.1, **base)
    with_units = omgd_jax.omgd_adamw(0.1, units=UNITS, **base)
    old = without.update(tree, without.init(tree), tree)[1]  # a state from before
    message = "this optimizer state was written without extra traversal units, but units="
    with pytest.raises(ValueError, match=re.escape(message)):
        with_units.update(tree, old, tree)
    with pytest.raises(ValueError, match=re.escape(message)):
        jax.jit(with_units.update)(tree, restore(save(old)), tree)
    new = with_units.init(tree)
    with pytest.raises(ValueError, match="written with extra traversal units"):
        without.update(tree, new, tree)


def test_a_state_written_with_other_frozen_leaves_is_refused():
    tree = unit_tree()
    tx = omgd_jax.omgd_adamw(0.1, **KW)
    other = omgd_jax.omgd_adamw(0.1, frozen="ln_f", **KW)
    with pytest.raises(ValueError, match="does not match the tree given to init"):
        other.update(tree, tx.init(tree), tree)


def tree_bytes(tree):
    return sum(
        math.prod(x.shape) * x.dtype.itemsize
        for x in jax.tree.leaves(tree)
        if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    )


def test_compact_state_bytes_with_units_on_gpt2_shapes():
    """The extra units share one slot: their state costs the largest unit's moments (plus its
    Adam count and the unit index), not their sum; frozen leaves take none."""
    from tests.test_compact import gpt2_param_shapes

    shapes = gpt2_param_shapes()
    kw = dict(granularity="layer", layers=r"^blocks/", layers_per_phase=3)

    def size(**more):
        return tree_bytes(
            jax.eval_shape(omgd_jax.omgd(optax.adam(1e-3), **kw, **more).init, shapes)
        )

    base, units = size(), size(units=r"^(wte|wpe)/")
    wte, wpe = (math.prod(shapes[k]["embedding"].shape) for k in ("wte", "wpe"))
    # base: two float32 moments of wte and of wpe; units: two of the larger (wte), + the
    # slot's int32 Adam count, + omgd_unit
    assert units == base - 8 * (wte + wpe) + 8 * max(wte, wpe) + 4 + 4
    assert size(frozen=r"^wpe/") == base - 8 * wpe  # no moments for a frozen leaf


ADAMW = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)


def run_two_cycles(tx, tree, steps_per_mask=2):
    params, state, update = random_tree(tree, 5), tx.init(tree), jax.jit(tx.update)
    for t in range(2 * 4 * steps_per_mask):  # M = 4 phases (2 layer groups, wte, head)
        u, state = update(quadratic_grads(params, t), state, params)
        params = optax.apply_updates(params, u)
    return params, state


@pytest.mark.parametrize("wte_rows", [16, 7])
def test_omgd_adamw_keeps_the_layer_views_adam_in_the_units_slot_and_trains_the_same(wte_rows):
    """With units= and no weight-decay mask, omgd_adamw's layer view (trained in other phases
    than any unit) keeps its Adam moments in the units' slot when they fit in its buffers
    (wte 16 x 3 = 48 elements; the view, 2 layers of a 3 x 6 kernel and a 3-scale, 42): the
    state holds the larger of the two, not both. A view that would lengthen the buffers
    (wte 7 x 3) keeps its own. Either way the parameters equal those of the same Adam with a
    state of its own (omgd(optax.adamw(...)), which does not know Adam is elementwise)."""
    tree = unit_tree() | {"wte": jnp.ones((wte_rows, 3))}
    kw = dict(steps_per_mask=2, key=3, **KW)
    shared, shared_state = run_two_cycles(omgd_jax.omgd_adamw(0.05, **ADAMW, **kw), tree)
    own, own_state = run_two_cycles(omgd_jax.omgd(optax.adamw(0.05, **ADAMW), **kw), tree)
    for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(own), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    view = optax.tree.get(own_state, "omgd_active_state")
    slot = optax.tree.get(shared_state, "omgd_unit_state")
    floats = sorted(x.shape[0] for k, x in slot.items() if k.startswith("float32"))
    assert floats == [wte_rows * 3] * 2  # mu and nu, as long as wte's either way
    inner = optax.tree.get(shared_state, "omgd_active_state")
    if wte_rows == 16:
        assert isinstance(inner, optax.EmptyState)
        # the view's moments and its count gone; the slot's count buffer holds the view's
        # two leaves' counts (2 int32) instead of the unit's one
        assert tree_bytes(own_state) - tree_bytes(shared_state) == tree_bytes(view) - 4
    else:
        assert tree_bytes(own_state) == tree_bytes(shared_state)


def test_a_weight_decay_mask_keeps_the_layer_views_adam_in_a_state_of_its_own():
    """A mask= decides the decay per leaf of the whole tree, which a leaf-by-leaf update in
    the slot would not see: the layer view keeps its own state, and training is unchanged."""
    tree = unit_tree()
    mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
    kw = dict(steps_per_mask=2, key=3, **KW)
    masked, state = run_two_cycles(omgd_jax.omgd_adamw(0.05, **ADAMW, mask=mask, **kw), tree)
    assert not isinstance(optax.tree.get(state, "omgd_active_state"), optax.EmptyState)
    ref, _ = run_two_cycles(omgd_jax.omgd(optax.adamw(0.05, **ADAMW, mask=mask), **kw), tree)
    for a, b in zip(jax.tree.leaves(masked), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("lean", [False, True])
def test_the_compiled_step_drops_the_layer_views_moments_with_them_in_the_slot(lean):
    """Compiled and donated, omgd_adamw's step with units= peaks (argument + temp bytes) below
    the same Adam with a state of its own by the layer view's two moments, less the update's
    temporaries for one leaf at a time (its read moments and its update, materialised so that
    the write of the slot is in place: a copy of the slot would cost more than the moments
    saved). Both the dense compact update and the lean step; a block of four leaves as in a
    transformer, whose view's state fits in the embedding's buffers."""
    n, d = 4, 256
    tree = {
        "wte": jnp.zeros((16 * d, d)),
        "blocks": {f"w{j}": jnp.zeros((n, d, d)) for j in range(4)},
        "head": jnp.zeros((d, 4)),
        "ln_f": jnp.zeros((d,)),
    }
    x = jnp.zeros((8, d))

    def loss_of(p, x):
        layer = lambda q, z: jnp.tanh(jnp.tanh(jnp.tanh(z @ q["w0"]) @ q["w1"]) @ q["w2"]) @ q["w3"]
        z = omgd_jax.scan_layers(layer, p["blocks"], x)
        return jnp.sum((z @ p["wte"][:d]) @ p["head"]) + jnp.sum(p["ln_f"])

    def peak(tx):
        state = tx.init(tree)
        if lean:
            step = omgd_jax.lean_train_step(loss_of, tx, layers=LAYERS, units=UNITS)
        else:
            step = omgd_jax.train_step(loss_of, tx)
        m = jax.jit(step, donate_argnums=(0, 1)).lower(tree, state, x).compile()
        m = m.memory_analysis()
        return m.argument_size_in_bytes + m.temp_size_in_bytes

    kw = dict(steps_per_mask=2, **KW)
    shared = peak(omgd_jax.omgd_adamw(0.05, **ADAMW, **kw))
    own = peak(omgd_jax.omgd(optax.adamw(0.05, **ADAMW), **kw))
    leaf = 2 * d * d * 4  # one leaf's [gamma, d, d] view, float32
    moments = 2 * 4 * leaf  # mu and nu of the view's four leaves
    assert own - shared >= moments - 3 * leaf - 4096, (own, shared, moments)  # 4096: scalars


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(units="^wte$", layers="^(?:blocks/|wte)"), ValueError,
         "leaf 'wte' is selected by both layers= and units="),
        (dict(units="^wte$", frozen="wte"), ValueError,
         "leaf 'wte' is selected by both units= and frozen="),
        (dict(frozen="attn"), ValueError,
         "leaf 'blocks/attn/kernel' is selected by both layers= and frozen="),
        (dict(units="^nothing$"), ValueError,
         "units='^nothing$' selects no floating-point leaf of the tree"),
        (dict(frozen="nothing"), ValueError,
         "frozen='nothing' selects no floating-point leaf of the tree"),
        (dict(units=UNITS, layers_per_phase=3), ValueError,
         "layers_per_phase=3 must divide the number of layers (4)"),
        (dict(units=UNITS, layers_per_phase=None, num_masks=5), ValueError,
         "num_masks=5 minus the 2 extra units of units= leaves 3 layer phases, which must divide"
         " the number of layers (4)"),
        (dict(units=UNITS, layers_per_phase=None, num_masks=2), ValueError,
         "num_masks=2 is the total number of phases M = N_L / gamma + E and must be larger than"
         " the 2 extra units of units="),
        (dict(units=lambda path, leaf: 3 if path == "wte" else None), TypeError,
         "units: the callable must return None or a unit name (a str), got 3 for leaf 'wte'"),
        (dict(units=r"^(x)?wte$"), ValueError,
         "units: the first capture group of '^(x)?wte$' took no part in the match of 'wte'"),
    ],
)  # fmt: skip
def test_tree_dependent_errors_name_the_argument_at_first_init(kwargs, error, match):
    args = dict(granularity="layer", layers=LAYERS, layers_per_phase=2) | kwargs
    tree = unit_tree()
    for tx in (
        omgd_jax.omgd_adamw(0.1, **args),
        omgd_jax.omgd_adamw(0.1, state="frozen", **args),
        omgd_jax.omgd_mask(**args),
    ):
        with pytest.raises(error, match=re.escape(match)):
            tx.update(tree, tx.init(tree), tree)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(num_masks=2, units="wte"), ValueError,
         "units= is only used with granularity='layer'"),
        (dict(num_masks=2, granularity="tensor", frozen="wte"), ValueError,
         "frozen= is only used with granularity='layer'"),
        (dict(granularity="layer", layers=LAYERS, layers_per_phase=1, units=3), TypeError,
         "units must be a regex string or a callable (path, leaf), got 3"),
    ],
)  # fmt: skip
def test_construction_errors_name_the_argument(kwargs, error, match):
    for factory in (omgd_jax.omgd_mask, functools.partial(omgd_jax.omgd_adamw, 0.1)):
        with pytest.raises(error, match=re.escape(match)):
            factory(**kwargs)


# ------------------------------------------------------------------------ LISA, the lean step
def test_lisa_and_lisa_wor_take_units():
    tree = unit_tree()
    wor = omgd_jax.lisa_wor(0.1, layers=LAYERS, layers_per_phase=2, steps_per_mask=1, units=UNITS)
    params, state = tree, wor.init(tree)
    seen = []
    for t in range(4):
        u, state = wor.update(quadratic_grads(params, t), state, params)
        new = optax.apply_updates(params, u)
        seen.append(moved(params, new) - {"ln_f"})
        params = new
    assert sorted(len(s) for s in seen) == [1, 1, 2, 2]
    assert set().union(*seen) == {"wte", "head"} | {("layer", i) for i in range(4)}
    with pytest.raises(TypeError, match="units must be a regex string or a callable"):
        omgd_jax.lisa(0.1, layers=LAYERS, layers_per_phase=1, steps_per_mask=1, units=3)


def lean_model():
    d, h, n = 4, 8, 4
    k = jax.random.split(jax.random.key(0), 5)
    params = {
        "embed": jax.random.normal(k[0], (d, d)) * 0.5,
        "blocks": {
            "w1": jax.random.normal(k[1], (n, d, h)) * 0.3,
            "w2": jax.random.normal(k[2], (n, h, d)) * 0.3,
        },
        "head": jax.random.normal(k[4], (d,)),
    }

    def loss_of(p, x):
        layer = lambda q, z: z + jnp.tanh(z @ q["w1"]) @ q["w2"]
        z = omgd_jax.scan_layers(layer, p["blocks"], x @ p["embed"])
        return jnp.mean((z @ p["head"]) ** 2)

    return params, loss_of


def test_todays_lean_step_with_units_equals_the_dense_compact_step():
    """The lean step does not know units= yet (it differentiates every non-layer leaf and the
    active ids even in a unit phase), but the compact update drops what is not trained, so the
    result is the dense step's."""
    params, loss_of = lean_model()
    tx = omgd_jax.omgd_adamw(
        1e-2,
        weight_decay=0.1,
        granularity="layer",
        layers=LAYERS,
        layers_per_phase=2,
        units=r"^(embed|head)$",
        steps_per_mask=2,
    )
    lean = jax.jit(omgd_jax.lean_train_step(loss_of, tx, layers=LAYERS))
    dense = jax.jit(omgd_jax.train_step(loss_of, tx))
    pl, sl, pd, sd = params, tx.init(params), params, tx.init(params)
    for t in range(8):
        x = jax.random.normal(jax.random.key(t), (3, 4))
        pl, sl, _ = lean(pl, sl, x)
        pd, sd, _ = dense(pd, sd, x)
        for a, b in zip(jax.tree.leaves(pl), jax.tree.leaves(pd), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert lean._cache_size() == 1
