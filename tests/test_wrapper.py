"""`omgd`, `omgd_adamw`: same masks as `omgd_mask`, compact and frozen state (omgd_jax.wrapper)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import omgd_jax
from benchmarks.update_cost import gpt2_shapes
from tests.conftest import masks_over, stacked_tree

CASES = [
    ("compact", dict(granularity="element")),
    ("compact", dict(granularity="layer", layers=r"^blocks/")),
    ("frozen", dict(granularity="element")),
    ("frozen", dict(granularity="element", layout="random")),
    ("frozen", dict(granularity="tensor")),
    ("frozen", dict(granularity="layer", layers=r"^blocks/")),
]


def random_tree(tree, seed):
    keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(tree)))
    leaves = [
        jax.random.normal(k, x.shape) for k, x in zip(keys, jax.tree.leaves(tree), strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)


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


def tree_bytes(tree):
    return sum(
        math.prod(x.shape) * x.dtype.itemsize
        for x in jax.tree.leaves(tree)
        if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    )


def test_compact_state_is_a_quarter_of_adams_on_gpt2():
    shapes = gpt2_shapes()  # the real 124M shapes, never materialised
    adam = tree_bytes(jax.eval_shape(optax.adam(1e-3).init, shapes))
    compact = tree_bytes(jax.eval_shape(omgd_jax.omgd(optax.adam(1e-3), 4).init, shapes))
    assert compact <= 0.27 * adam
    layer = omgd_jax.omgd(
        optax.adam(1e-3), granularity="layer", layers=r"^blocks/", layers_per_phase=3
    )
    layer_bytes = tree_bytes(jax.eval_shape(layer.init, shapes))
    # Embeddings + head + 3 of 12 blocks: 2 floats per trained parameter (SPEC §4).
    blocks = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["blocks"]))
    others = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) - blocks
    assert layer_bytes == pytest.approx(8 * (others + blocks / 4), rel=1e-4)


def test_compact_restarts_the_inner_state_when_the_mask_changes():
    params = {"w": jnp.zeros((8,))}
    tx = omgd_jax.omgd(optax.adam(1.0), 2, 3)
    state = tx.init(params)
    g = {"w": jnp.ones(8)}
    counts = []
    for _ in range(7):
        _, state = tx.update(g, state, params)
        counts.append(int(optax.tree.get(state, "count")))
    assert counts == [1, 2, 3, 1, 2, 3, 1]


def test_compact_layer_keeps_the_always_active_state():
    tree = stacked_tree(num_layers=4)
    tx = omgd_jax.omgd(optax.adam(1.0), 2, 1, granularity="layer", layers=r"^blocks/")
    state = tx.init(tree)
    for _ in range(3):
        _, state = tx.update(tree, state, tree)
    assert int(state.omgd_dense_state[0].count) == 3
    assert int(state.omgd_active_state[0].count) == 1
    assert state.omgd_active_state[0].mu["blocks"]["attn"]["kernel"].shape[0] == 2


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
