"""MoFaSGD: the factored momentum against NumPy, full-rank exactness, state bytes, optax use."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import omgd_jax
from omgd_jax._src.baselines.mofasgd import (
    factored_momentum_step,
    mofasgd,
    scale_by_mofasgd,
    state_bytes_per_matrix,
)
from tests.conftest import stacked_tree


def orthonormal(rng, m, r):
    return np.linalg.qr(rng.normal(size=(m, r)))[0]


def truncate(a, r):
    """NumPy's rank-r truncation of ``a``: (U_r diag(S_r) V_r^T, S_r)."""
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r], s[:r]


def tangent(u, v, g):
    pu, pv = u @ u.T, v @ v.T
    return pu @ g + g @ pv - pu @ g @ pv


def product(u, s, v):
    return (np.asarray(u) * np.asarray(s)) @ np.asarray(v).T


@pytest.mark.parametrize("m,n,r", [(7, 5, 2), (4, 9, 3), (6, 6, 1)])
def test_step_is_the_rank_r_truncation_of_beta_m_plus_tangent_projection(m, n, r):
    rng = np.random.default_rng(m * n + r)
    u, v = orthonormal(rng, m, r), orthonormal(rng, n, r)
    s = np.sort(rng.uniform(0.5, 2.0, r))[::-1]
    g = rng.normal(size=(m, n))
    beta = 0.9
    target, target_s = truncate(beta * (u * s) @ v.T + tangent(u, v, g), r)
    args = [jnp.asarray(x, jnp.float32) for x in (u, s, v, g)]
    u2, s2, v2 = factored_momentum_step(*args, beta)
    np.testing.assert_allclose(product(u2, s2, v2), target, atol=2e-5)
    np.testing.assert_allclose(s2, target_s, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(u2).T @ np.asarray(u2), np.eye(r), atol=2e-5)
    np.testing.assert_allclose(np.asarray(v2).T @ np.asarray(v2), np.eye(r), atol=2e-5)


@pytest.mark.parametrize("update", ["orthogonal", "inverse_sv"])
def test_transformation_follows_numpy_over_steps(update):
    rng = np.random.default_rng(1)
    m, n, r, beta, max_value = 6, 5, 2, 0.8, 2.0
    tx = scale_by_mofasgd(r, beta, update=update, max_value=max_value, init="random", key=3)
    params = {"w": jnp.zeros((m, n))}
    state = tx.init(params)
    u, s, v = (np.asarray(x[0], np.float64) for x in state[1:])
    np.testing.assert_array_equal(s, 0.0)  # random init: S = 0, orthonormal U, V
    np.testing.assert_allclose(u.T @ u, np.eye(r), atol=1e-6)
    for _ in range(4):
        g = rng.normal(size=(m, n))
        target, target_s = truncate(beta * (u * s) @ v.T + tangent(u, v, g), r)
        out, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        u, s, v = (np.asarray(x[0], np.float64) for x in state[1:])
        np.testing.assert_allclose((u * s) @ v.T, target, atol=5e-5)
        np.testing.assert_allclose(s, target_s, rtol=5e-5)
        w = np.ones(r) if update == "orthogonal" else np.minimum(1 / s, max_value)
        np.testing.assert_allclose(out["w"], (u * w) @ v.T, atol=5e-5)


@pytest.mark.parametrize("init", ["weight_svd", "grad_svd"])
def test_full_rank_momentum_is_the_dense_momentum(init):
    rng = np.random.default_rng(2)
    beta = 0.9
    w0 = rng.normal(size=(3, 4, 6)).astype(np.float32)  # a stack of 3 layers, vmapped
    params = {"blocks": {"kernel": jnp.asarray(w0)}}
    tx = scale_by_mofasgd(rank=4, beta=beta, init=init)  # r = min(m, n): full rank
    state = tx.init(params)
    # weight_svd starts the momentum at W0 (the released code); grad_svd at M_1 = G_1.
    dense = w0.astype(np.float64) if init == "weight_svd" else None
    for _ in range(5):
        g = rng.normal(size=w0.shape).astype(np.float32)
        dense = g if dense is None else beta * dense + g
        _, state = tx.update({"blocks": {"kernel": jnp.asarray(g)}}, state, params)
        u, s, v = (np.asarray(x[0], np.float64) for x in state[1:])
        for layer in range(3):
            np.testing.assert_allclose(
                (u[layer] * s[layer]) @ v[layer].T, dense[layer], atol=1e-4, rtol=1e-4
            )


def test_grad_svd_starts_from_the_first_gradient():
    rng = np.random.default_rng(3)
    g = rng.normal(size=(5, 4)).astype(np.float32)
    tx = scale_by_mofasgd(rank=2, init="grad_svd")
    params = {"w": jnp.zeros((5, 4))}
    _, state = tx.update({"w": jnp.asarray(g)}, tx.init(params), params)
    target, target_s = truncate(g.astype(np.float64), 2)
    np.testing.assert_allclose(product(state[1][0], state[2][0], state[3][0]), target, atol=1e-5)
    np.testing.assert_allclose(state[2][0], target_s, rtol=1e-5)


def test_weight_svd_starts_from_the_weights_factors():
    rng = np.random.default_rng(4)
    w = rng.normal(size=(6, 4)).astype(np.float32)
    state = scale_by_mofasgd(rank=3).init({"w": jnp.asarray(w)})
    target, target_s = truncate(w.astype(np.float64), 3)
    np.testing.assert_allclose(product(state[1][0], state[2][0], state[3][0]), target, atol=1e-5)
    np.testing.assert_allclose(state[2][0], target_s, rtol=1e-5)


def float_bytes(tree):
    return sum(
        x.nbytes
        for x in jax.tree.leaves(tree)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
    )


def test_state_bytes_are_r_m_plus_n_plus_r_per_matrix():
    params = {"a": jnp.ones((10, 7)), "blocks": {"k": jnp.ones((3, 8, 12))}}
    state = scale_by_mofasgd(rank=4).init(params)
    expected = state_bytes_per_matrix(4, 10, 7) + 3 * state_bytes_per_matrix(4, 8, 12)
    assert expected == 4 * ((4 * 17 + 4) + 3 * (4 * 20 + 4))
    assert float_bytes(state) == expected
    small = scale_by_mofasgd(rank=9).init({"a": jnp.ones((10, 7))})  # r clipped to 7
    assert float_bytes(small) == 4 * (7 * 17 + 7)


def test_mofasgd_state_on_the_gpt_tree_is_factors_plus_adamw_on_the_rest():
    params = nnx.as_pure(nnx.state(gpt_nano(), nnx.Param))
    rank = 4
    state = mofasgd(0.01, rank).init(params)
    factored = adamw_params = 0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        if name.startswith("blocks/") and name.endswith("kernel"):  # stacked matrices
            factored += x.shape[0] * state_bytes_per_matrix(rank, *x.shape[1:])
        else:
            adamw_params += math.prod(x.shape)
    assert float_bytes(state) == factored + 2 * 4 * adamw_params


def test_partition_sends_embeddings_norms_and_biases_to_adamw():
    params = stacked_tree()
    tx = mofasgd(0.1, rank=2, adamw_learning_rate=0.5)
    g = jax.tree.map(jnp.ones_like, params)
    u, _ = tx.update(g, tx.init(params), params)
    adam = optax.adamw(0.5, b1=0.9, b2=0.95, weight_decay=0.0)
    ua, _ = adam.update(g, adam.init(params), params)
    for path in (("wte",), ("blocks", "ln", "scale"), ("ln_f",)):
        a, b = u, ua
        for k in path:
            a, b = a[k], b[k]
        np.testing.assert_allclose(a, b, rtol=1e-6)
    kernel = np.asarray(u["blocks"]["attn"]["kernel"])  # -0.1 U V^T per layer: rank <= 2
    assert kernel.shape == (4, 3, 6)
    for layer in kernel:
        assert np.linalg.matrix_rank(layer, tol=1e-5) <= 2
        assert np.isclose(np.linalg.norm(layer, 2), 0.1, rtol=1e-5)  # spectral norm = lr


FACTORIES = {
    "scale": lambda: scale_by_mofasgd(2),
    "scale-grad": lambda: scale_by_mofasgd(2, update="inverse_sv", init="grad_svd"),
    "mofasgd": lambda: mofasgd(1e-2, 2),
    "mofasgd-random": lambda: mofasgd(1e-2, 2, init="random", leaves=r"kernel$"),
}


def matrices_only(tree):
    return {"a": tree["blocks"]["attn"]["kernel"], "b": tree["wte"]}


def tree_for(name):
    params = stacked_tree()
    return matrices_only(params) if name.startswith("scale") else params


def spec(x):
    return jax.tree.map(lambda a: (a.shape, a.dtype), x)


@pytest.mark.parametrize("name", FACTORIES)
def test_init_on_shapes_and_stable_state_under_jit(name):
    tx, params = FACTORIES[name](), tree_for(name)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    state = tx.init(params)
    assert spec(jax.eval_shape(tx.init, abstract)) == spec(state)
    assert spec(tx.init(abstract)) == spec(state)
    traces = []

    @jax.jit
    def step(p, s, g):
        traces.append(1)
        return tx.update(g, s, p)

    g = jax.tree.map(lambda x: 0.1 * x + 0.01, params)
    for _ in range(3):
        _, new = step(params, state, g)
        assert spec(new) == spec(state)
        assert jax.tree.structure(new) == jax.tree.structure(state)
        state = new
    assert len(traces) == 1


def test_chain_inject_hyperparams_multisteps_extra_args():
    params = stacked_tree()
    g = jax.tree.map(lambda x: 0.1 * x, params)
    tx = optax.chain(optax.clip_by_global_norm(1.0), mofasgd(0.1, 2))
    state = tx.init(params)
    tx.update(g, state, params, loss=jnp.float32(1.0))  # extra args pass through partition

    make = optax.inject_hyperparams(mofasgd, static_args=omgd_jax.static_args(mofasgd))
    tx = make(learning_rate=0.1, rank=2, beta=0.9)
    state = tx.init(params)
    u1, _ = tx.update(g, state, params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.2)
    u2, _ = tx.update(g, state, params)
    k1, k2 = u1["blocks"]["attn"]["kernel"], u2["blocks"]["attn"]["kernel"]
    np.testing.assert_allclose(k2, 2 * k1, rtol=1e-5)

    multi = optax.MultiSteps(scale_by_mofasgd(2), every_k_schedule=2)
    mats = matrices_only(params)
    state = multi.init(mats)
    for _ in range(4):
        _, state = multi.update(matrices_only(g), state, mats)
    assert int(optax.tree.get(state, "mofasgd_count")) == 2


@pytest.mark.parametrize("name", ["scale", "mofasgd"])
def test_map_params_maps_the_adamw_moments_only(name):
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    tx = scale_by_mofasgd(2) if name == "scale" else mofasgd(0.1, 2)
    params = {"w": params["w"]} if name == "scale" else params
    state = tx.init(params)
    specs = jax.tree.map(lambda x: f"spec{x.ndim}", params)
    keep_masked = lambda p, s: p if isinstance(p, optax.MaskedNode) else s
    mapped = optax.tree.map_params(
        tx,
        keep_masked,
        state,
        specs,
        transform_non_params=lambda _: None,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )
    found = [x for x in jax.tree.leaves(mapped) if isinstance(x, str)]
    # the factors are not params-shaped; AdamW's mu and nu hold the bias (the matrix masked).
    assert found == ([] if name == "scale" else ["spec1", "spec1"])
    assert optax.tree.get(mapped, "mofasgd_u") is None  # transform_non_params reached it


def test_clear_errors():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        scale_by_mofasgd(0)
    with pytest.raises(TypeError, match="rank must be an int"):
        mofasgd(0.1, 2.0)
    with pytest.raises(ValueError, match="update must be one of"):
        scale_by_mofasgd(2, update="newton")
    with pytest.raises(ValueError, match="init must be one of"):
        mofasgd(0.1, 2, init="zeros")
    with pytest.raises(ValueError, match="beta must be >= 0"):
        scale_by_mofasgd(2, beta=-0.5)
    with pytest.raises(TypeError, match="key must be"):
        scale_by_mofasgd(2, key=1.5)
    with pytest.raises(TypeError, match="leaves must be"):
        mofasgd(0.1, 2, leaves=7)
    with pytest.raises(ValueError, match="factors 2-D leaves"):
        scale_by_mofasgd(2).init({"b": jnp.ones(3)})
    with pytest.raises(ValueError, match="leaves selected a leaf of shape"):
        mofasgd(0.1, 2, leaves="b").init({"b": jnp.ones(3)})


def gpt_nano():
    from examples.gpt2.model import GPT, get_config

    return GPT(get_config("nano", vocab_size=64), nnx.Rngs(0))  # small vocab: fast compile


def test_nnx_optimizer_lowers_the_loss_of_gpt_nano():
    model = gpt_nano()
    optimizer = nnx.Optimizer(model, mofasgd(0.02, rank=4, adamw_learning_rate=3e-3), wrt=nnx.Param)
    tokens = jax.random.randint(jax.random.key(0), (4, 17), 0, 64)
    x, y = tokens[:, :-1], tokens[:, 1:]

    @nnx.jit
    def train_step(model, optimizer):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer)) for _ in range(4)]
    assert losses[3] < losses[0]  # three updates lower the loss


def test_many_matrices_in_one_jitted_step_do_not_deadlock():
    # jaxlib's batched CPU LAPACK kernels wait on XLA:CPU's pool: several at once deadlocked on
    # 2 cores; the transformation calls them one matrix at a time. 12 stacked leaves hung with
    # vmap on CPU.
    params = {f"w{i}": jax.random.normal(jax.random.key(i), (2, 32, 64)) for i in range(12)}
    tx = scale_by_mofasgd(32, init="random")
    update = jax.jit(tx.update)
    state = jax.jit(tx.init)(params)
    for _ in range(3):
        u, state = update(params, state, params)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(u))


def test_batched_and_layer_by_layer_paths_agree():
    # vmap is used off CPU, lax.map on CPU: the same maths either way.
    from omgd_jax._src.baselines.mofasgd import _over_layers

    rng = np.random.default_rng(5)
    u = jnp.asarray(np.stack([orthonormal(rng, 6, 2) for _ in range(3)]), jnp.float32)
    v = jnp.asarray(np.stack([orthonormal(rng, 4, 2) for _ in range(3)]), jnp.float32)
    s = jnp.asarray(rng.uniform(0.5, 1.0, (3, 2)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(3, 6, 4)), jnp.float32)
    step = lambda *a: factored_momentum_step(*a, 0.9)
    outs = [_over_layers(step, True, batched)(u, s, v, g) for batched in (True, False)]
    (u1, s1, v1), (u2, s2, v2) = outs
    np.testing.assert_allclose(s1, s2, rtol=1e-5)
    for layer in range(3):  # the products: the SVD's signs may differ
        np.testing.assert_allclose(
            product(u1[layer], s1[layer], v1[layer]),
            product(u2[layer], s2[layer], v2[layer]),
            atol=1e-5,
        )
