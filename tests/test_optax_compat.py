"""Optax citizenship: chain, inject_hyperparams, MultiSteps, map_params, shapes, jit, Flax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import omgd_jax
from tests.conftest import stacked_tree

FACTORIES = {
    "mask": lambda: omgd_jax.omgd_mask(2, 2),
    "mask-layer": lambda: omgd_jax.omgd_mask(2, 2, granularity="layer", layers=r"^blocks/"),
    "compact": lambda: omgd_jax.omgd_adamw(1e-2, num_masks=2, steps_per_mask=2),
    "compact-layer": lambda: omgd_jax.omgd_adamw(
        1e-2, num_masks=2, steps_per_mask=2, granularity="layer", layers=r"^blocks/"
    ),
    "frozen": lambda: omgd_jax.omgd_adamw(1e-2, num_masks=2, steps_per_mask=2, state="frozen"),
}


def spec(x):
    return jax.tree.map(lambda a: (a.shape, a.dtype), x)


@pytest.mark.parametrize("name", FACTORIES)
def test_init_on_shapes_and_stable_state_under_jit(name):
    tx, params = FACTORIES[name](), stacked_tree()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    state = tx.init(params)
    assert spec(jax.eval_shape(tx.init, abstract)) == spec(state)
    assert spec(tx.init(abstract)) == spec(state)  # init runs on ShapeDtypeStruct directly
    traces = []

    @jax.jit
    def step(p, s, g):
        traces.append(1)
        return tx.update(g, s, p)

    for _ in range(3):
        _, state2 = step(params, state, params)
        assert spec(state2) == spec(state)
        assert jax.tree.structure(state2) == jax.tree.structure(state)
        state = state2
    assert len(traces) == 1  # no retrace on later calls


@pytest.mark.parametrize("name", FACTORIES)
def test_unknown_extra_args_are_accepted_and_change_nothing(name):
    tx, params = FACTORIES[name](), stacked_tree()
    grads = jax.tree.map(lambda x: 0.5 * x, params)
    state = tx.init(params)
    with_extra, _ = tx.update(grads, state, params, some_loss=jnp.float32(1.0))
    without, _ = tx.update(grads, state, params)
    jax.tree.map(np.testing.assert_array_equal, with_extra, without)


def recording_identity(calls):
    """An inner optimizer that passes updates through and records the extra args it gets."""

    def update(updates, state, params=None, **extra_args):
        calls.append(extra_args)
        return updates, state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


@pytest.mark.parametrize(
    "state, kwargs, inner_calls",
    [
        ("compact", dict(), 1),  # one call on the view of the windows
        ("compact", dict(granularity="layer", layers=r"^blocks/"), 2),  # view and dense part
        ("frozen", dict(), 4),  # one call per floating leaf
        ("frozen", dict(granularity="layer", layers=r"^blocks/"), 4),
    ],
)
def test_extra_args_are_forwarded_to_the_inner_optimizer(state, kwargs, inner_calls):
    calls = []
    tx = omgd_jax.omgd(recording_identity(calls), 2, state=state, **kwargs)
    params = stacked_tree()
    loss = jnp.float32(3.5)
    tx.update(params, tx.init(params), params, mask_index=1, some_loss=loss)
    assert len(calls) == inner_calls
    for extra in calls:  # mask_index is the wrapper's; everything else reaches the inner
        assert set(extra) == {"some_loss"}
        assert float(extra["some_loss"]) == 3.5


def test_chain_and_named_chain_find_the_state():
    params = stacked_tree()
    tx = optax.named_chain(
        ("clip", optax.clip_by_global_norm(1.0)),
        ("omgd", omgd_jax.omgd_mask(4, 3, key=2)),
        ("adam", optax.adam(1e-3)),
    )
    state = tx.init(params)
    for _ in range(5):
        _, state = tx.update(params, state, params)
    assert int(optax.tree.get(state, "omgd_step")) == 5
    assert jax.dtypes.issubdtype(optax.tree.get(state, "omgd_key").dtype, jax.dtypes.prng_key)


def test_inject_hyperparams_with_static_args():
    params = {"w": jnp.ones((8,))}
    make = optax.inject_hyperparams(
        omgd_jax.omgd_adamw, static_args=omgd_jax.static_args(omgd_jax.omgd_adamw)
    )
    tx = make(learning_rate=0.1, num_masks=2, steps_per_mask=1, weight_decay=0.0)
    state = tx.init(params)
    g = {"w": jnp.ones(8)}
    u1, _ = tx.update(g, state, params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.2)
    u2, _ = tx.update(g, state, params)
    np.testing.assert_allclose(u2["w"], 2 * u1["w"], rtol=1e-6)
    # A schedule as the learning rate: step t uses schedule(t), inside the hyperparams.
    sched = make(learning_rate=optax.linear_schedule(0.1, 0.0, 10), num_masks=2)
    constant = make(learning_rate=0.1, num_masks=2)
    s_sched, s_const = sched.init(params), constant.init(params)
    u_sched, s_sched = sched.update(g, s_sched, params)
    u_const, s_const = constant.update(g, s_const, params)
    np.testing.assert_allclose(u_sched["w"], u_const["w"], rtol=1e-6)  # schedule(0) = 0.1
    _, s_sched = sched.update(g, s_sched, params)
    assert float(s_sched.hyperparams["learning_rate"]) == pytest.approx(0.09)  # schedule(1)
    # omgd_mask under inject_hyperparams: the same masks as without it.
    masked = optax.inject_hyperparams(
        omgd_jax.omgd_mask, static_args=omgd_jax.static_args(omgd_jax.omgd_mask)
    )(2, 1, key=3)
    plain = omgd_jax.omgd_mask(2, 1, key=3)
    s_masked, s_plain = masked.init(params), plain.init(params)
    for _ in range(2):
        u_masked, s_masked = masked.update(g, s_masked, params)
        u_plain, s_plain = plain.update(g, s_plain, params)
        np.testing.assert_array_equal(u_masked["w"], u_plain["w"])
    assert float(jnp.sum(u_plain["w"])) == 8.0  # half of the 8 entries at M = 2


def test_multisteps_phases_count_optimizer_steps():
    params = {"w": jnp.ones((6,))}
    tx = optax.MultiSteps(
        optax.chain(omgd_jax.omgd_mask(3, 2, key=0), optax.sgd(1.0)), every_k_schedule=4
    )
    state = tx.init(params)
    g = {"w": jnp.ones(6)}
    total = jnp.zeros(6)
    for _ in range(4 * 6):  # 6 optimizer steps = one cycle of 3 masks x 2 steps
        u, state = tx.update(g, state, params)
        total = total + u["w"]
    assert int(optax.tree.get(state, "omgd_step")) == 6
    np.testing.assert_allclose(total, -6.0)  # every coordinate: 2 steps of M * 1


@pytest.mark.parametrize("name", ["mask", "frozen", "compact"])
def test_map_params_handles_the_placeholder(name):
    params = {"a": jnp.ones((4, 2)), "b": jnp.ones((3,))}
    tx = FACTORIES[name]()
    state = tx.init(params)
    specs = jax.tree.map(lambda x: f"spec{x.ndim}", params)
    mapped = optax.tree.map_params(
        tx,
        lambda _, s: s,
        state,
        specs,
        transform_non_params=lambda _: None,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )
    found = [x for x in jax.tree.leaves(mapped) if isinstance(x, str)]
    if name == "frozen":  # Adam's moments are params-shaped, one per unit
        assert found == ["spec2", "spec1"] * 2
    else:  # the mask has no params-shaped state; compact state is not params-shaped
        assert found == []


class Stack(nnx.Module):
    """A tiny NNX model with stacked layers, as `nnx.vmap` makes them."""

    def __init__(self, rngs, layers=4, width=8):
        self.embed = nnx.Linear(3, width, rngs=rngs)

        @nnx.vmap(in_axes=0, out_axes=0)
        def make(key):
            return nnx.Linear(width, width, rngs=nnx.Rngs(key))

        self.blocks = make(jax.random.split(rngs.params(), layers))
        self.head = nnx.Linear(width, 1, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x)

        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def body(block, x):
            return jnp.tanh(block(x))

        return self.head(body(self.blocks, x))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_masks=2),
        dict(granularity="layer", layers=r"^blocks/", layers_per_phase=2),
        dict(granularity="layer", layers=r"^blocks/", layers_per_phase=1, state="frozen"),
    ],
)
def test_flax_nnx_optimizer_trains_a_stacked_model(kwargs):
    model = Stack(nnx.Rngs(0))
    tx = omgd_jax.omgd_adamw(3e-2, steps_per_mask=3, **kwargs)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (32, 3))
    y = jnp.sin(x.sum(1, keepdims=True))

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer)) for _ in range(60)]
    assert losses[-1] < 0.5 * losses[0]
