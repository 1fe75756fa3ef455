"""Views of the active share and the compact state of `omgd` (omgd_jax.compact)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import omgd_jax
from examples.gpt2.model import GPT, get_config
from omgd_jax._src import compact
from omgd_jax._src import layers as layers_lib
from tests.conftest import random_tree, stacked_tree


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=3).map(tuple),
    num_masks=st.integers(1, 5),
)
def test_window_read_write_round_trip_with_padding(shape, num_masks):
    x = jnp.arange(1, math.prod(shape) + 1, dtype=jnp.float32).reshape(shape)
    n, c = x.size, -(-x.size // num_masks)
    padded = np.concatenate([np.ravel(x), np.zeros(num_masks * c - n)])
    total = jnp.zeros(shape)
    for label in range(num_masks):
        window = compact.read_window(x, jnp.int32(label), num_masks)
        assert (
            window.shape == compact.window_shape(shape, num_masks) == (c,) + (1,) * (len(shape) - 1)
        )
        # Band `label` of the flattened leaf; past the end of the leaf, zeros (the padding).
        np.testing.assert_array_equal(np.ravel(window), padded[label * c : (label + 1) * c])
        full = compact.write_window(window, shape, jnp.int32(label), num_masks)
        in_band = (np.arange(n) >= label * c) & (np.arange(n) < (label + 1) * c)
        np.testing.assert_array_equal(np.ravel(full), np.where(in_band, np.ravel(x), 0))
        total = total + full
    np.testing.assert_array_equal(total, x)  # the bands tile the leaf


def test_window_shape_keeps_the_rank():
    assert compact.window_shape((10, 3), 4) == (8, 1)  # ceil(30 / 4) = 8
    assert compact.window_shape((5,), 5) == (1,)
    assert compact.window_shape((), 3) == ()


def test_layer_read_write_stacked():
    tree = stacked_tree(num_layers=4)
    tree["blocks"]["ln"]["scale"] = jnp.arange(12.0).reshape(4, 3)
    leaves = jax.tree.leaves(tree)
    plan = layers_lib.plan_layers(tree, r"^blocks/")
    ids = jnp.array([2, 0], jnp.int32)
    view = compact.read_layers(plan, leaves, ids)
    k, scale = 1, tree["blocks"]["ln"]["scale"]  # leaves: attn/kernel, ln/scale, ln_f, wte
    assert leaves[k] is scale
    np.testing.assert_array_equal(view[k], scale[np.array([2, 0])])
    assert [v is compact.MASKED for v in view] == [r != layers_lib.STACKED for r in plan.roles]
    out = compact.write_layers(plan, view, leaves, ids)
    np.testing.assert_array_equal(
        out[k], np.where(np.isin(np.arange(4), [0, 2])[:, None], scale, 0)
    )
    assert [o is None for o in out] == [r != layers_lib.STACKED for r in plan.roles]


def unrolled_tree(stacked):
    """The layers of a stacked tree as separate leaves h_0 .. h_{N-1}."""
    out = {k: v for k, v in stacked.items() if k != "blocks"}
    depth = jax.tree.leaves(stacked["blocks"])[0].shape[0]
    for i in range(depth):
        out[f"h_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked["blocks"])
    return out


def test_layer_read_write_unrolled():
    stacked = jax.tree.map(lambda x: x + jnp.arange(x.size).reshape(x.shape), stacked_tree(4))
    tree = unrolled_tree(stacked)
    leaves, treedef = jax.tree.flatten(tree)
    plan = layers_lib.plan_layers(tree, r"^h_(\d+)/")
    ids = jnp.array([3, 1], jnp.int32)
    flat_view = compact.read_layers(plan, leaves, ids)
    paths = [layers_lib.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    outside = [p for p, v in zip(paths, flat_view, strict=True) if v is compact.MASKED]
    assert [p.split("/")[0] for p in outside] == ["h_2", "h_2", "h_3", "h_3", "ln_f", "wte"]
    view = jax.tree.unflatten(treedef, flat_view)
    for slot, layer in enumerate([3, 1]):  # slot s sits at the leaves of layer s
        jax.tree.map(np.testing.assert_array_equal, view[f"h_{slot}"], tree[f"h_{layer}"])
    out = jax.tree.unflatten(
        treedef, compact.write_layers(plan, treedef.flatten_up_to(view), leaves, ids)
    )
    for layer in range(4):
        expect = (
            tree[f"h_{layer}"] if layer in (1, 3) else jax.tree.map(jnp.zeros_like, tree["h_0"])
        )
        jax.tree.map(np.testing.assert_array_equal, out[f"h_{layer}"], expect)


def test_unrolled_layers_of_different_shapes_are_an_error():
    tree = {"h_0": {"w": jnp.ones((2, 2))}, "h_1": {"w": jnp.ones((3, 2))}}
    tx = omgd_jax.omgd(optax.adam(1e-3), 2, granularity="layer", layers=r"^h_(\d+)/")
    with pytest.raises(ValueError, match="layer 1 differs from layer 0. Stack the layers"):
        tx.init(tree)


def test_compact_state_with_unrolled_layers_equals_the_stacked_one_step_for_step():
    params_stacked = random_tree(stacked_tree(num_layers=4), 0)
    params_unrolled = unrolled_tree(params_stacked)

    def make(layers):
        inner = optax.adamw(0.05, weight_decay=0.1)
        return omgd_jax.omgd(inner, 2, 2, key=5, granularity="layer", layers=layers)

    tx_s, tx_u = make(r"^blocks/"), make(r"^h_(\d+)/")
    s_s, s_u = tx_s.init(params_stacked), tx_u.init(params_unrolled)
    step_s, step_u = jax.jit(tx_s.update), jax.jit(tx_u.update)
    p_s, p_u = params_stacked, params_unrolled
    for t in range(3 * 2 * 2):  # three cycles of 2 masks x 2 steps
        g = random_tree(params_stacked, 100 + t)
        u_s, s_s = step_s(g, s_s, p_s)
        u_u, s_u = step_u(unrolled_tree(g), s_u, p_u)
        p_s, p_u = optax.apply_updates(p_s, u_s), optax.apply_updates(p_u, u_u)
        assert int(s_s.omgd_phase) == int(s_u.omgd_phase)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
            unrolled_tree(p_s),
            p_u,
        )
        # The view's moments: slot s of the stacked view sits at the leaves of layer s.
        mu_s, mu_u = (
            optax.tree.get(s_s.omgd_active_state, "mu"),
            optax.tree.get(s_u.omgd_active_state, "mu"),
        )
        for slot in range(2):
            jax.tree.map(
                np.testing.assert_array_equal,
                jax.tree.map(lambda x, s=slot: x[s], mu_s["blocks"]),
                mu_u[f"h_{slot}"],
            )
    moved = [
        not np.array_equal(p_u[f"h_{i}"]["ln"]["scale"], params_unrolled[f"h_{i}"]["ln"]["scale"])
        for i in range(4)
    ]
    assert all(moved)  # every layer was trained at some point


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


def test_compact_restarts_when_mask_index_changes_and_only_then():
    params = {"w": jnp.zeros((8,))}
    tx = omgd_jax.omgd(optax.adam(1.0), 2, 2)
    state = tx.init(params)
    g = {"w": jnp.ones(8)}
    counts, phases = [], []
    for j in [1, 1, 0, 0, 0]:  # steps 0..3 are cycle 0, step 4 is cycle 1
        _, state = tx.update(g, state, params, mask_index=j)
        counts.append(int(optax.tree.get(state, "count")))
        phases.append(int(state.omgd_phase))
    assert phases == [1, 1, 0, 0, 2]  # cycle * M + mask
    assert counts == [1, 2, 1, 2, 1]


def test_compact_layer_keeps_the_always_active_state():
    tree = stacked_tree(num_layers=4)
    tx = omgd_jax.omgd(optax.adam(1.0), 2, 1, granularity="layer", layers=r"^blocks/")
    state = tx.init(tree)
    for _ in range(3):
        _, state = tx.update(tree, state, tree)
    assert int(state.omgd_dense_state[0].count) == 3
    assert int(state.omgd_active_state[0].count) == 1
    assert state.omgd_active_state[0].mu["blocks"]["attn"]["kernel"].shape[0] == 2


def tree_bytes(tree):
    return sum(
        math.prod(x.shape) * x.dtype.itemsize
        for x in jax.tree.leaves(tree)
        if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    )


def gpt2_param_shapes():
    """The parameter tree of examples/gpt2's GPT-2-124M, as shapes (never materialised)."""
    model = nnx.eval_shape(lambda: GPT(get_config("gpt2-124m"), nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_compact_state_is_a_quarter_of_adams_on_gpt2():
    shapes = gpt2_param_shapes()
    adam = tree_bytes(jax.eval_shape(optax.adam(1e-3).init, shapes))
    assert adam == pytest.approx(8 * 124_475_904, abs=16)  # nanoGPT's count, 2 floats each
    compact_bytes = tree_bytes(jax.eval_shape(omgd_jax.omgd(optax.adam(1e-3), 4).init, shapes))
    assert compact_bytes <= 0.27 * adam
    layer = omgd_jax.omgd(
        optax.adam(1e-3), granularity="layer", layers=r"^blocks/", layers_per_phase=3
    )
    layer_bytes = tree_bytes(jax.eval_shape(layer.init, shapes))
    # Embeddings + final norm + 3 of 12 blocks: 2 floats per trained parameter (SPEC §4).
    blocks = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["blocks"]))
    others = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) - blocks
    assert layer_bytes == pytest.approx(8 * (others + blocks / 4), rel=1e-4)


@settings(max_examples=30, deadline=None)
@given(
    blocks=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 4)), min_size=1, max_size=3),
    num_masks=st.integers(1, 5),
)
def test_sharded_windows_cut_every_block_and_tile_the_leaf(blocks, num_masks):
    """Shard grid G: band `label` of every block's flattened coordinates (NumPy reference),
    window shape (G_0 c, G_1, ...); the M windows written back tile the leaf."""
    grid = tuple(g for g, _ in blocks)
    shape = tuple(g * d for g, d in blocks)
    x = jnp.arange(1, math.prod(shape) + 1, dtype=jnp.float32).reshape(shape)
    k, n_b = len(shape), math.prod(d for _, d in blocks)
    c = -(-n_b // num_masks)
    # NumPy: the blocks in grid order, each flattened and zero-padded to M c.
    split = np.asarray(x).reshape([v for g, d in blocks for v in (g, d)])
    per_block = split.transpose(list(range(0, 2 * k, 2)) + list(range(1, 2 * k, 2)))
    per_block = per_block.reshape(grid + (n_b,))
    padded = np.concatenate([per_block, np.zeros(grid + (num_masks * c - n_b,))], axis=-1)
    total = jnp.zeros(shape)
    for label in range(num_masks):
        window = compact.read_window(x, jnp.int32(label), num_masks, grid)
        assert window.shape == compact.window_shape(shape, num_masks, grid)
        assert window.shape == (grid[0] * c,) + grid[1:]
        expect = np.moveaxis(padded[..., label * c : (label + 1) * c], k, 1)
        np.testing.assert_array_equal(window, expect.reshape(window.shape))
        total = total + compact.write_window(window, shape, jnp.int32(label), num_masks, grid)
    np.testing.assert_array_equal(total, x)  # the bands tile the leaf


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 7), min_size=0, max_size=3).map(tuple),
    num_masks=st.integers(1, 5),
)
def test_strided_windows_are_rows_j_j_plus_m_and_tile_the_leaf(shape, num_masks):
    x = jnp.arange(1, math.prod(shape) + 1, dtype=jnp.float32).reshape(shape)
    rows = shape[0] if shape else 1
    total = jnp.zeros(shape)
    for label in range(num_masks):
        t = jnp.int32(label)
        window = compact.read_strided(x, t, num_masks)
        assert window.shape == compact.strided_window_shape(shape, num_masks)
        if shape:
            mine = np.arange(label, rows, num_masks)  # rows label, label + M, ...
            expected = np.zeros(window.shape, np.float32)
            expected[: len(mine)] = np.asarray(x)[mine]  # zero rows past the end
            np.testing.assert_array_equal(window, expected)
        full = compact.write_strided(window, shape, t, num_masks)
        on = np.asarray(omgd_jax.MaskSchedule.strided_rows(shape, t, num_masks))
        np.testing.assert_array_equal(full, np.where(on, x, 0))  # the mask's band
        total = total + full
    np.testing.assert_array_equal(total, x)


def test_strided_compact_equals_the_frozen_state_of_the_same_bands():
    """omgd(adam, state="compact", layout="strided") moves the band rows as the per-unit
    (frozen) state moves them, step for step over two cycles: the inner state restarts in
    both when a band comes back, so the updates agree."""
    params = random_tree({"w": jnp.zeros((8, 3)), "b": jnp.zeros((5,))}, 1)
    kw = dict(num_masks=4, steps_per_mask=1, key=3, layout="strided")
    compact_tx = omgd_jax.omgd(optax.sgd(0.1), **kw)
    mask_tx = optax.chain(omgd_jax.omgd_mask(**kw), optax.sgd(0.1))
    s1, s2 = compact_tx.init(params), mask_tx.init(params)
    assert jax.tree.map(jnp.shape, s1.omgd_active_state) is not None
    for t in range(8):
        g = random_tree(params, 10 + t)
        u1, s1 = compact_tx.update(g, s1, params)
        u2, s2 = mask_tx.update(g, s2, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u1, u2)
        rows = np.flatnonzero(np.asarray(u1["w"]).any(axis=1))
        assert len(rows) == 2 and rows[1] - rows[0] == 4  # rows j and j + M
