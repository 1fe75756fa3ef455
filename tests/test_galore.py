"""GaLore and GoLore: projection, side, stacked leaves, the Stiefel law (omgd_jax.galore)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import omgd_jax
from tests.conftest import stacked_tree

GALORE_STATIC = ("rank", "update_proj_gap", "projector_side", "leaves", "mask")
GOLORE_STATIC = GALORE_STATIC + ("svd_steps", "key")


def random_tree(tree, seed):
    keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(tree)))
    leaves = [
        jax.random.normal(k, x.shape) for k, x in zip(keys, jax.tree.leaves(tree), strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def nbytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def run(tx, params, steps, seed=0):
    state, update, out = tx.init(params), jax.jit(tx.update), []
    for t in range(steps):
        u, state = update(random_tree(params, seed + t), state, params)
        out.append(u)
        params = optax.apply_updates(params, u)
    return out, state


MATRICES = {"w": jnp.ones((6, 4)), "v": jnp.ones((3, 5)), "sq": jnp.ones((4, 4)), "b": jnp.ones(4)}
SETTINGS = dict(rank=2, update_proj_gap=2, scale=0.5, weight_decay=0.1)


def test_optax_side_equals_optax_contrib_galore_step_for_step():
    params = random_tree(MATRICES, 50)
    ref = optax.contrib.galore(1e-2, base_optimizer=optax.scale_by_adam(0.8, 0.9, 1e-6), **SETTINGS)
    adam = dict(b1=0.8, b2=0.9, eps=1e-6)
    ours = omgd_jax.galore(
        1e-2, projector_side="optax", leaves=lambda path, x: x.ndim == 2, **adam, **SETTINGS
    )
    assert isinstance(ours.init(params)[0], omgd_jax.GaloreState)  # the projected-space path
    delegated = omgd_jax.galore(1e-2, projector_side="optax", **adam, **SETTINGS)
    assert isinstance(delegated.init(params)[0], optax.contrib.GaLoreState)  # optax's own
    expected, _ = run(ref, params, 6)
    for tx in (ours, delegated):
        got, _ = run(tx, params, 6)
        for u, v in zip(got, expected, strict=True):
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), u, v)


def numpy_galore(grads, rank, alpha, lr, b1, b2, eps, left):
    """GaLore's update with one SVD projector (float64): R = P^T G or G P, Adam, back, scale."""
    g0 = np.asarray(grads[0], np.float64)
    u, _, vt = np.linalg.svd(g0, full_matrices=False)
    p = u[:, :rank] if left else vt[:rank].T
    m = v = 0.0
    out = []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        r = p.T @ g if left else g @ p
        m = b1 * m + (1 - b1) * r
        v = b2 * v + (1 - b2) * r**2
        n = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        out.append(-lr * alpha * (p @ n if left else n @ p.T))
    return out


@pytest.mark.parametrize(
    "shape, side, left",
    [
        ((3, 7), "paper", True),  # m < n: the paper projects m (left)
        ((7, 3), "paper", False),  # m > n: the paper projects n (right)
        ((4, 4), "paper", False),  # ties: right, as the released code
        ((7, 3), "optax", True),  # optax projects the larger side
        ((3, 7), "optax", False),
    ],
)
def test_projection_matches_numpy_within_one_projector(shape, side, left):
    params = {"w": jnp.zeros(shape)}
    grads = [random_tree(params, t)["w"] for t in range(3)]
    tx = omgd_jax.galore(
        0.1,
        rank=2,
        update_proj_gap=3,
        scale=0.25,
        projector_side=side,
        leaves="w",
        b1=0.5,
        b2=0.8,
        eps=1e-3,
    )
    state, update, got = tx.init(params), jax.jit(tx.update), []
    for g in grads:
        u, state = update({"w": g}, state, params)
        got.append(u["w"])
    want = numpy_galore(grads, 2, 0.25, 0.1, 0.5, 0.8, 1e-3, left)
    np.testing.assert_allclose(np.stack(got), np.stack(want), rtol=2e-4, atol=1e-6)
    d = shape[0] if left else shape[1]
    assert optax.tree.get(state, "galore_projector")["w"].shape == (d, 2)


def test_projector_refreshes_every_gap_from_the_current_gradient():
    params = {"w": jnp.zeros((5, 8))}
    tx = omgd_jax.galore(0.1, rank=2, update_proj_gap=2)
    state = tx.init(params)
    for t in range(5):
        g = random_tree(params, t)["w"]
        _, state = tx.update({"w": g}, state, params)
        p = np.asarray(optax.tree.get(state, "galore_projector")["w"])
        if t % 2 == 0:
            basis = np.linalg.svd(np.asarray(g))[0][:, :2]
            np.testing.assert_allclose(np.abs(p.T @ basis), np.eye(2), atol=1e-4)
            last = p
        np.testing.assert_array_equal(p, last)  # held between refreshes


@pytest.mark.parametrize(
    "side, per_matrix",
    [
        ("paper", lambda m, n, r: min(m, n) * r + 2 * max(m, n) * r),
        ("optax", lambda m, n, r: max(m, n) * r + 2 * min(m, n) * r),
    ],
)
def test_state_bytes_are_the_layout_of_the_side(side, per_matrix):
    m, n, r = 16, 40, 4
    params = {"w": jnp.zeros((m, n)), "b": jnp.zeros(n)}
    state = omgd_jax.galore(1e-3, rank=r, projector_side=side).init(params)
    counters = 4 + 4 + (8 if side == "paper" else 0)  # Adam's count, GaLore's count, key
    assert nbytes(state) == 4 * (per_matrix(m, n, r) + 2 * n) + counters


def test_stacked_leaves_get_one_projector_per_layer():
    layers, m, n = 3, 4, 6
    stacked = {"blocks": jnp.zeros((layers, m, n))}
    unrolled = {f"h{i}": jnp.zeros((m, n)) for i in range(layers)}
    kw = dict(rank=2, update_proj_gap=2, scale=0.5)
    tx_s = omgd_jax.galore(0.1, leaves="blocks", **kw)
    tx_u = omgd_jax.galore(0.1, **kw)
    s_s, s_u = tx_s.init(stacked), tx_u.init(unrolled)
    up_s, up_u = jax.jit(tx_s.update), jax.jit(tx_u.update)
    assert optax.tree.get(s_s, "galore_projector")["blocks"].shape == (layers, m, 2)
    for t in range(4):
        g = random_tree(stacked, t)["blocks"]
        u_s, s_s = up_s({"blocks": g}, s_s, stacked)
        u_u, s_u = up_u({f"h{i}": g[i] for i in range(layers)}, s_u, unrolled)
        for i in range(layers):
            np.testing.assert_allclose(u_s["blocks"][i], u_u[f"h{i}"], rtol=1e-5, atol=1e-7)


def test_galore_on_the_gpt_like_tree_projects_only_the_chosen_kernels():
    params = stacked_tree(num_layers=4, width=3)  # blocks/attn/kernel: (4, 3, 6)
    state = omgd_jax.galore(1e-3, rank=2, leaves=r"^blocks/.*kernel").init(params)
    projector = optax.tree.get(state, "galore_projector")
    assert projector["blocks"]["attn"]["kernel"].shape == (4, 3, 2)
    assert isinstance(projector["wte"], optax.MaskedNode)  # 2-D but not chosen: plain Adam
    assert optax.tree.get(state, "mu")["wte"].shape == (7, 3)


# ----------------------------------------------------------------------------------- GoLore
def test_golore_projectors_are_orthonormal_keyed_and_switch_after_svd_steps():
    params = {"blocks": jnp.zeros((2, 5, 9))}
    kw = dict(rank=3, update_proj_gap=1, leaves="blocks")
    galore_p, golore_p = [], {}
    for key in (0, 0, 1):
        tx = omgd_jax.golore(0.1, svd_steps=2, key=key, **kw)
        state, ps, update = tx.init(params), [], jax.jit(tx.update)
        for t in range(4):
            _, state = update(random_tree(params, t), state, params)
            ps.append(np.asarray(optax.tree.get(state, "galore_projector")["blocks"]))
        golore_p.setdefault(key, []).append(ps)
    ref = omgd_jax.galore(0.1, **kw)
    state, update = ref.init(params), jax.jit(ref.update)
    for t in range(4):
        _, state = update(random_tree(params, t), state, params)
        galore_p.append(np.asarray(optax.tree.get(state, "galore_projector")["blocks"]))
    first, again = golore_p[0]
    for t in range(4):
        for p in first[t]:  # every layer's projector: P^T P = I
            np.testing.assert_allclose(p.T @ p, np.eye(3), atol=1e-5)
        np.testing.assert_array_equal(first[t], again[t])  # same key, same draws
    for t in (0, 1):  # before svd_steps: the SVD projector of GaLore
        np.testing.assert_array_equal(first[t], galore_p[t])
    for t in (2, 3):  # after: random, not the SVD's, and different for another key
        assert not np.allclose(np.abs(first[t][0].T @ galore_p[t][0]), np.eye(3), atol=1e-2)
        assert not np.allclose(first[t], golore_p[1][0][t])
    assert not np.allclose(first[2], first[3])  # a fresh draw at each refresh


def stiefel_statistics(projectors):
    """For P of shape (draws, d, r): mean P, mean P P^T, and ||P^T v||^2 for two v."""
    d = projectors.shape[1]
    e1 = np.eye(d)[0]
    flat = np.ones(d) / np.sqrt(d)
    norm2 = lambda v: np.sum(np.einsum("kdr,d->kr", projectors, v) ** 2, axis=1)
    return (
        projectors.mean(0),
        np.einsum("kdr,ker->de", projectors, projectors) / len(projectors),
        norm2(e1),
        norm2(flat),
    )


def check_uniform_law(projectors, r):
    draws, d = projectors.shape[:2]
    mean_p, mean_ppt, along_e1, along_flat = stiefel_statistics(projectors)
    # Haar: E[P] = 0 (a sign-uncorrected QR fails this: its P[0, 0] is always negative) and
    # E[P P^T] = (r/d) I; ||P^T v||^2 ~ Beta(r/2, (d-r)/2) for every unit v (rotation
    # invariance): mean r/d, variance 2r(d-r)/(d^2(d+2)). Tolerances: 6 standard errors.
    se = 6 / np.sqrt(draws)
    np.testing.assert_allclose(mean_p, 0.0, atol=se)
    np.testing.assert_allclose(mean_ppt, (r / d) * np.eye(d), atol=se)
    var = 2 * r * (d - r) / (d**2 * (d + 2))
    for stat in (along_e1, along_flat):
        np.testing.assert_allclose(stat.mean(), r / d, atol=6 * np.sqrt(var / draws))
        np.testing.assert_allclose(stat.var(), var, rtol=0.15)


def test_stiefel_projector_is_uniform_in_law():
    d, r, draws = 6, 2, 4000
    keys = jax.random.split(jax.random.key(0), draws)
    projectors = np.asarray(jax.vmap(lambda k: omgd_jax.stiefel_projector(k, d, r))(keys))
    np.testing.assert_allclose(
        np.einsum("kdr,kds->krs", projectors, projectors),
        np.broadcast_to(np.eye(r), (draws, r, r)),
        atol=1e-5,
    )
    check_uniform_law(projectors, r)


def test_golore_state_projectors_are_uniform_in_law_over_keys():
    d, r, draws = 6, 2, 2000
    params = {"w": jnp.zeros((d, 10))}  # paper side: left, P is 6 x 2
    core = omgd_jax.golore(0.1, rank=r, key=0)
    state = core.init(params)
    g = {"w": jnp.ones((d, 10))}  # the projector must not depend on the gradient

    def projector(key):
        s = (state[0]._replace(galore_key=key),) + tuple(state[1:])
        _, new = core.update(g, s, params)
        return new[0].galore_projector["w"]

    keys = jax.random.split(jax.random.key(3), draws)
    check_uniform_law(np.asarray(jax.jit(jax.vmap(projector))(keys)), r)


# ------------------------------------------------------------------------------- citizenship
def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        omgd_jax.galore(0.1, rank=0)
    with pytest.raises(TypeError, match="rank must be an int"):
        omgd_jax.golore(0.1, rank=2.5)
    with pytest.raises(ValueError, match="update_proj_gap must be >= 1"):
        omgd_jax.galore(0.1, update_proj_gap=0)
    with pytest.raises(ValueError, match="projector_side must be one of"):
        omgd_jax.galore(0.1, projector_side="left")
    with pytest.raises(TypeError, match="leaves must be None, a regex"):
        omgd_jax.galore(0.1, leaves=3)
    with pytest.raises(ValueError, match="svd_steps must be >= 0"):
        omgd_jax.golore(0.1, svd_steps=-1)
    with pytest.raises(TypeError, match="key must be"):
        omgd_jax.golore(0.1, key="seed")
    with pytest.raises(ValueError, match="selects no leaf"):
        omgd_jax.galore(0.1, leaves="^nothing").init({"w": jnp.ones((2, 3))})
    with pytest.raises(ValueError, match="needs >= 2 axes"):
        omgd_jax.galore(0.1, leaves="b").init({"b": jnp.ones(3)})
    with pytest.raises(ValueError, match="rank must be <= dim"):
        omgd_jax.stiefel_projector(jax.random.key(0), 2, 3)


FACTORIES = {
    "galore": lambda: omgd_jax.galore(1e-2, rank=2, update_proj_gap=2, leaves="kernel"),
    "golore": lambda: omgd_jax.golore(1e-2, rank=2, update_proj_gap=2, svd_steps=2),
}


@pytest.mark.parametrize("name", FACTORIES)
def test_init_on_shapes_stable_state_under_jit_and_chain(name):
    params = stacked_tree(num_layers=2, width=3)
    tx = optax.chain(optax.clip_by_global_norm(1.0), FACTORIES[name]())
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


@pytest.mark.parametrize("name", FACTORIES)
def test_multisteps_and_map_params(name):
    params = {"w": jnp.ones((3, 4)), "kernel": jnp.ones((4, 5))}
    multi = optax.MultiSteps(FACTORIES[name](), every_k_schedule=2)
    state, update = multi.init(params), jax.jit(multi.update)
    for t in range(4):
        _, state = update(random_tree(params, t), state, params)
    assert int(optax.tree.get(state, "galore_count")) == 2
    tx = FACTORIES[name]()
    mapped = optax.tree.map_params(
        tx, lambda x: "params", tx.init(params), transform_non_params=lambda _: "other"
    )
    # Nothing in the state is params-shaped (moments live in the projected space).
    assert set(jax.tree.leaves(mapped)) == {"other"}


@pytest.mark.parametrize(
    "factory, static", [(omgd_jax.galore, GALORE_STATIC), (omgd_jax.golore, GOLORE_STATIC)]
)
def test_inject_hyperparams_with_static_args(factory, static):
    params = {"w": jnp.ones((3, 4))}
    make = optax.inject_hyperparams(factory, static_args=static)
    tx = make(0.1, rank=2, update_proj_gap=3)
    state = tx.init(params)
    g = random_tree(params, 0)
    u1, _ = tx.update(g, state, params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.3)
    state.hyperparams["scale"] = jnp.asarray(0.5)  # a hyperparameter too (was 0.25)
    u2, _ = tx.update(g, state, params)
    np.testing.assert_allclose(u2["w"], 6 * u1["w"], rtol=1e-5)


def test_stacked_svd_refresh_works_one_layer_at_a_time():
    """The projector refresh factors a [N_L, m, n] stack layer by layer: its temporaries are
    the full-size update plus one layer's factors, not a float32 copy and the factors of every
    layer at once (2.25x the stack before)."""
    layers, m, n = 8, 64, 256
    params = {"blocks": {"kernel": jax.ShapeDtypeStruct((layers, m, n), jnp.float32)}}
    tx = omgd_jax.galore(1e-3, rank=8, leaves=r"kernel")
    state = jax.eval_shape(tx.init, params)

    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(1, 2)).lower(params, state, params).compile()
    stack, layer = layers * m * n * 4, m * n * 4
    assert compiled.memory_analysis().temp_size_in_bytes < stack + 4 * layer


@pytest.mark.parametrize("svd_steps", [None, 1])
def test_scale_by_galore_then_decay_and_lr_is_galore_or_golore(svd_steps):
    params = {"w": jnp.ones((6, 4)), "b": jnp.ones(4)}
    kw = dict(rank=2, update_proj_gap=2, leaves="w")
    if svd_steps is None:
        full = omgd_jax.galore(0.1, weight_decay=0.01, **kw)
    else:
        full = omgd_jax.golore(0.1, weight_decay=0.01, svd_steps=svd_steps, key=3, **kw)
        kw.update(svd_steps=svd_steps, key=3)
    parts = optax.chain(
        omgd_jax.scale_by_galore(**kw),
        optax.add_decayed_weights(0.01),
        optax.scale_by_learning_rate(0.1),
    )
    s1, s2 = full.init(params), parts.init(params)
    for t in range(4):
        g = jax.tree.map(
            lambda x, t=t: jnp.sin(jnp.arange(x.size, dtype=jnp.float32) + t).reshape(x.shape),
            params,
        )
        u1, s1 = full.update(g, s1, params)
        u2, s2 = parts.update(g, s2, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), u1, u2)
