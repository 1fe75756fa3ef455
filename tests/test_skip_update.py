"""SkipUpdate and Magma: block rule, mask laws, Magma's score by hand, optax citizenship."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import omgd_jax
from omgd_jax._src.baselines.skip_update import (
    block_counts,
    draw_blocks,
    magma,
    magma_adamw,
    num_groups,
    skip_update,
    skip_update_adamw,
)
from omgd_jax._src.layers import path_str
from tests.conftest import stacked_tree


def gpt_nano():
    from examples.gpt2.model import GPT, get_config

    return GPT(get_config("nano", vocab_size=64), nnx.Rngs(0))  # small vocab: fast compile


def test_default_blocks_on_the_gpt2_tree():
    state = nnx.state(gpt_nano(), nnx.Param)
    pure = nnx.as_pure(state)
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(pure)[0]]
    counts = dict(zip(paths, block_counts(pure), strict=True))
    kernels = {f"blocks/{m}/kernel" for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc")}
    kernels.add("blocks/mlp/c_proj/kernel")
    assert {p for p, c in counts.items() if c} == kernels
    assert all(counts[p] == 2 for p in kernels)  # nano: 2 stacked layers, a draw each
    assert block_counts(state) == block_counts(pure)  # init sees Variables ('.../value')
    unrolled = {"h": [{"w": jnp.ones((2, 2)), "b": jnp.ones(2)}] * 2, "wte": jnp.ones((5, 2))}
    assert block_counts(unrolled) == [0, 1, 0, 1, 0]  # h/0/w, h/1/w: a block each


def test_default_blocks_on_plain_matrices_and_custom_rules():
    tree = {
        "w1": jnp.ones((3, 4)),
        "w2": jnp.ones((4, 2)),
        "b": jnp.ones(2),
        "t": jnp.ones((2, 2, 2)),
    }
    assert block_counts(tree) == [0, 0, 1, 1]  # leaves sorted: b, t, w1, w2
    assert block_counts(tree, r"^t$|^b$") == [1, 2, 0, 0]  # a 3-D match is stacked
    rule = lambda path, leaf: "stacked" if path == "w1" else path == "w2"
    assert block_counts(tree, rule) == [0, 0, 3, 1]
    with pytest.raises(TypeError, match="must return a bool or 'stacked'"):
        block_counts(tree, lambda path, leaf: 3)


def expected_over_keys(make_tx, params, grads, num_keys):
    """Mean update over ``num_keys`` mask keys (one step each)."""

    def one(k):
        tx = make_tx(k)
        return tx.update(grads, tx.init(params), params)[0]

    updates = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(0), num_keys))
    return jax.tree.map(lambda u: u.mean(0), updates)


@pytest.mark.parametrize("p", [0.5, 0.25])
def test_skip_update_is_unbiased_over_keys(p):
    params = {"a": jnp.ones((3, 2)), "b": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    grads = {"a": jnp.full((3, 2), 2.0), "b": jnp.full((2, 2), -1.0), "bias": jnp.full(2, 3.0)}
    n = 4000
    mean = expected_over_keys(lambda k: skip_update(optax.sgd(1.0), p, key=k), params, grads, n)
    # Each block's update is (z/p) * delta with z ~ Bernoulli(p): the mean of n draws has
    # standard deviation |delta| sqrt((1 - p) / (p n)) <= 0.028 |delta| here; 5 sigma = 0.14.
    tol = 5 * np.sqrt((1 - p) / (p * n))
    np.testing.assert_allclose(mean["a"], -grads["a"], rtol=tol)
    np.testing.assert_allclose(mean["b"], -grads["b"], rtol=tol)
    np.testing.assert_allclose(mean["bias"], -grads["bias"], rtol=1e-6)  # dense: the inner


def test_skip_update_draws_one_bernoulli_per_block_scaled():
    params = stacked_tree(num_layers=6)
    tx = skip_update(optax.sgd(1.0), 0.5, key=3)
    state = tx.init(params)
    g = jax.tree.map(jnp.ones_like, params)
    counts = block_counts(params)
    for step in range(4):
        u, state = tx.update(g, state, params)
        z = np.asarray(draw_blocks(jax.random.key(3), step, 0.5, sum(counts), "iid"))
        kernel = np.asarray(u["blocks"]["attn"]["kernel"])
        np.testing.assert_array_equal(kernel, -2.0 * z[:, None, None] * np.ones_like(kernel))
        np.testing.assert_array_equal(u["wte"], -1.0)  # embedding: dense
        np.testing.assert_array_equal(u["blocks"]["ln"]["scale"], -1.0)  # norm: dense


def mask_sequence(key, steps=20, traversal="iid"):
    params = {f"w{i}": jnp.ones((2, 2)) for i in range(8)}
    tx = skip_update(optax.sgd(1.0), 0.5, key=key, traversal=traversal)
    state = tx.init(params)
    out = []
    for _ in range(steps):
        u, state = tx.update(params, state, params)
        out.append([bool(u[k][0, 0] != 0) for k in sorted(u)])
    return out


@pytest.mark.parametrize("traversal", ["iid", "wor"])
def test_masks_repeat_for_a_key_and_differ_between_keys(traversal):
    a = mask_sequence(1, traversal=traversal)
    assert a == mask_sequence(1, traversal=traversal)
    assert a == mask_sequence(jax.random.key(1), traversal=traversal)  # int and typed key agree
    assert a != mask_sequence(2, traversal=traversal)


draw_jit = jax.jit(draw_blocks, static_argnums=(2, 3, 4))


@settings(max_examples=20, deadline=None)
@given(
    num_blocks=st.integers(1, 17),
    inv_p=st.sampled_from([1.0, 2.0, 3.0, 4.0, 1 / 0.3]),
    seed=st.integers(0, 2**31 - 1),
    cycle=st.integers(0, 5),
)
def test_wor_keeps_every_block_once_per_cycle(num_blocks, inv_p, seed, cycle):
    p = 1.0 / inv_p
    m = num_groups(p)
    key = jax.random.key(seed)
    z = np.stack([draw_jit(key, cycle * m + j, p, num_blocks, "wor") for j in range(m)])  # (M, B)
    np.testing.assert_array_equal(z.sum(0), 1.0)  # every block exactly once per cycle
    assert z.sum(1).max() - z.sum(1).min() <= 1  # groups of nearly equal count


def test_wor_through_the_transformation_sums_to_m_deltas():
    params = {f"w{i}": jnp.ones((2, 3)) for i in range(5)}
    tx = skip_update(optax.sgd(1.0), 1 / 3, traversal="wor", key=4)
    state = tx.init(params)
    total = jax.tree.map(jnp.zeros_like, params)
    for _ in range(2 * 3):  # two cycles of M = 3
        u, state = tx.update(params, state, params)
        total = jax.tree.map(jnp.add, total, u)
    for v in total.values():
        np.testing.assert_allclose(v, -2 * 3.0)  # kept once per cycle, scaled by M


def adam_reference(grads_seq, b1=0.9, b2=0.999, eps=1e-8):
    """NumPy Adam: (mu_t, delta_t) for every step."""
    mu = nu = 0.0
    out = []
    for t, g in enumerate(grads_seq, start=1):
        mu = b1 * mu + (1 - b1) * g
        nu = b2 * nu + (1 - b2) * g * g
        delta = -(mu / (1 - b1**t)) / (np.sqrt(nu / (1 - b2**t)) + eps)
        out.append((mu, delta))
    return out


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


@pytest.mark.parametrize("momentum", ["after", "before"])
def test_magma_score_and_ema_on_two_blocks_by_hand(momentum):
    rng = np.random.default_rng(0)
    shapes = {"a": (2, 2), "b": (3, 2)}
    seq = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(4)]
    seq[2]["b"] = np.zeros((3, 2), np.float32)  # zero gradient: cosine 0, score pulled to 0.5
    params = {k: jnp.zeros(s) for k, s in shapes.items()}
    tau, ema = 2.0, 0.9
    tx = magma(optax.adam(1.0), p=1.0, tau=tau, momentum=momentum)  # p = 1: z = 1
    state = tx.init(params)
    for name in shapes:
        ref = adam_reference([g[name] for g in seq])
        s, prev_mu = 0.5, np.zeros(shapes[name])
        expected = []
        for (mu, delta), g in zip(ref, seq, strict=True):
            m = mu if momentum == "after" else prev_mu
            norms = np.linalg.norm(m) * np.linalg.norm(g[name])
            cos = 0.0 if norms == 0 else float((m * g[name]).sum() / norms)
            s = ema * s + (1 - ema) * sigmoid(cos / tau)
            expected.append((s, s * delta))
            prev_mu = mu
        state_i = state
        for t, g in enumerate(seq):
            u, state_i = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state_i, params)
            index = sorted(shapes).index(name)
            np.testing.assert_allclose(state_i.magma_score[index], [expected[t][0]], rtol=1e-6)
            np.testing.assert_allclose(u[name], expected[t][1], rtol=1e-5, atol=1e-7)


def test_magma_masks_without_rescaling_unless_unbiased():
    params = {f"w{i}": jnp.zeros((2, 2)) for i in range(6)}
    g = {k: jnp.ones((2, 2)) for k in params}
    for unbiased, scale in ((False, 1.0), (True, 2.0)):
        tx = magma(optax.sgd(1.0, momentum=0.0), p=0.5, key=5, unbiased=unbiased)
        u, state = tx.update(g, tx.init(params), params)
        z = np.asarray(draw_blocks(jax.random.key(5), 0, 0.5, 6, "iid"))
        s = np.asarray(state.magma_score).reshape(-1)  # cos(g, g) = 1 for sgd's trace
        np.testing.assert_allclose(s, 0.9 * 0.5 + 0.1 * sigmoid(0.5), rtol=1e-6)
        got = np.array([float(u[k][0, 0]) for k in sorted(u)])
        np.testing.assert_allclose(got, -scale * s * z, rtol=1e-6)
        assert 0 < z.sum() < 6  # the example does mask something


def test_weight_decay_masked_or_dense():
    params = {"w": jnp.full((2, 2), 2.0)}
    g = {"w": jnp.ones((2, 2))}
    # key 0 drops the only block at step 0 with p = 0.5? find a step where it is dropped.
    z = [float(draw_blocks(jax.random.key(0), t, 0.5, 1, "iid")[0]) for t in range(10)]
    dropped = z.index(0.0)
    for decay, expected in (("masked", 0.0), ("dense", 0.1 * 2.0)):
        tx = skip_update(optax.identity(), 0.5, weight_decay=0.1, decay=decay)
        state = tx.init(params)
        for _ in range(dropped + 1):
            u, state = tx.update(g, state, params)
        np.testing.assert_allclose(u["w"], expected)


def test_adamw_aliases_match_the_explicit_chain():
    params = stacked_tree()
    g = jax.tree.map(lambda x: 0.1 * x, params)
    for alias, wrapper in ((magma_adamw, magma), (skip_update_adamw, skip_update)):
        a = alias(0.1, weight_decay=0.2, decay="dense", key=2)
        b = optax.chain(
            wrapper(optax.scale_by_adam(), key=2, weight_decay=0.2, decay="dense"),
            optax.scale_by_learning_rate(0.1),
        )
        ua, _ = a.update(g, a.init(params), params)
        ub, _ = b.update(g, b.init(params), params)
        jax.tree.map(np.testing.assert_array_equal, ua, ub)


FACTORIES = {
    "skip": lambda: skip_update(optax.adam(1e-2), 0.5),
    "skip-wor": lambda: skip_update(optax.adam(1e-2), 0.5, traversal="wor"),
    "magma": lambda: magma(optax.adam(1e-2)),
    "magma-wor": lambda: magma_adamw(1e-2, traversal="wor", decay="dense"),
}


def spec(x):
    return jax.tree.map(lambda a: (a.shape, a.dtype), x)


@pytest.mark.parametrize("name", FACTORIES)
def test_init_on_shapes_and_stable_state_under_jit(name):
    tx, params = FACTORIES[name](), stacked_tree()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    state = tx.init(params)
    assert spec(jax.eval_shape(tx.init, abstract)) == spec(state)
    assert spec(tx.init(abstract)) == spec(state)
    traces = []

    @jax.jit
    def step(p, s, g):
        traces.append(1)
        return tx.update(g, s, p)

    for _ in range(3):
        _, new = step(params, state, params)
        assert spec(new) == spec(state)
        assert jax.tree.structure(new) == jax.tree.structure(state)
        state = new
    assert len(traces) == 1


def recording_inner(log):
    """sgd(1) that records the extra arguments it receives."""

    def update(updates, state, params=None, **extra):
        log.append(extra)
        return jax.tree.map(lambda g: -g, updates), state

    return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)


def test_extra_args_reach_the_inner_optimizer():
    log = []
    params = {"w": jnp.ones((2, 2))}
    tx = optax.chain(skip_update(recording_inner(log), 0.5), optax.identity())
    tx.update(params, tx.init(params), params, loss=jnp.float32(3.0))
    assert list(log[0]) == ["loss"] and float(log[0]["loss"]) == 3.0


def test_chain_inject_hyperparams_multisteps():
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
    g = jax.tree.map(jnp.ones_like, params)
    tx = optax.chain(optax.clip_by_global_norm(1.0), magma(optax.adam(1e-2), key=1))
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update(g, state, params)
    assert int(optax.tree.get(state, "magma_step")) == 3

    make = optax.inject_hyperparams(magma, static_args=omgd_jax.static_args(magma) + ("p",))
    tx = make(optax.sgd(1.0, momentum=0.0), p=1.0, tau=2.0, traversal="wor")
    state = tx.init(params)
    u1, _ = tx.update(g, state, params)
    state.hyperparams["tau"] = jnp.asarray(1e9)  # score -> sigmoid(0) = 0.5 in the EMA
    u2, _ = tx.update(g, state, params)
    s1, s2 = 0.9 * 0.5 + 0.1 * sigmoid(0.5), 0.5
    np.testing.assert_allclose(u1["w"], -s1, rtol=1e-6)
    np.testing.assert_allclose(u2["w"], -s2, rtol=1e-6)

    multi = optax.MultiSteps(skip_update(optax.sgd(1.0), 0.5), every_k_schedule=3)
    state = multi.init(params)
    for _ in range(6):
        _, state = multi.update(g, state, params)
    assert int(optax.tree.get(state, "skip_step")) == 2  # inner steps, not micro-steps


@pytest.mark.parametrize("name", FACTORIES)
def test_map_params_sees_the_inner_moments_only(name):
    params = {"a": jnp.ones((4, 2)), "b": jnp.ones((3,))}
    tx = FACTORIES[name]()
    state = tx.init(params)
    specs = jax.tree.map(lambda x: f"spec{x.ndim}", params)
    mapped = optax.tree.map_params(
        tx, lambda _, s: s, state, specs, transform_non_params=lambda _: None
    )
    found = [x for x in jax.tree.leaves(mapped) if isinstance(x, str)]
    assert found == ["spec2", "spec1"] * 2  # Adam's mu and nu; keys and scores are not params


def test_clear_errors():
    sgd = optax.sgd(1.0)
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\]"):
        skip_update(sgd, 0.0)
    with pytest.raises(ValueError, match="traversal must be one of"):
        skip_update(sgd, traversal="cyclic")
    with pytest.raises(ValueError, match="momentum must be one of"):
        magma(sgd, momentum="during")
    with pytest.raises(ValueError, match="decay must be one of"):
        magma(sgd, decay="never")
    with pytest.raises(ValueError, match="tau must be > 0"):
        magma(sgd, tau=0.0)
    with pytest.raises(ValueError, match=r"ema must be in \[0, 1\)"):
        magma(sgd, ema=1.0)
    with pytest.raises(TypeError, match="key must be"):
        skip_update(sgd, key="seed")
    with pytest.raises(TypeError, match="inner must be"):
        magma(lambda g: g)
    with pytest.raises(TypeError, match="leaves must be"):
        skip_update(sgd, leaves=3)
    with pytest.raises(TypeError, match="p must be a Python float"):
        skip_update(sgd, jnp.float32(0.5), traversal="wor")
    tx = magma(sgd)  # plain sgd keeps no first moment
    params = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="first moment"):
        tx.update(params, tx.init(params), params)


@pytest.mark.parametrize(
    "make",
    [
        lambda: skip_update_adamw(3e-3, weight_decay=0.0, traversal="wor"),
        lambda: magma_adamw(1e-2, weight_decay=0.0, traversal="wor"),
    ],
)
def test_nnx_optimizer_lowers_the_loss_of_gpt_nano(make):
    model = gpt_nano()
    optimizer = nnx.Optimizer(model, make(), wrt=nnx.Param)
    tokens = jax.random.randint(jax.random.key(0), (4, 17), 0, 64)
    x, y = tokens[:, :-1], tokens[:, 1:]

    @nnx.jit
    def train_step(model, optimizer):
        def loss_fn(m):
            logits = m(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer)) for _ in range(4)]
    assert losses[3] < losses[0]  # three updates lower the loss
