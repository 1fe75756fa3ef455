"""The lean step with units beyond the layers (issue 19): ``units=`` (embedding, head as
traversal units) and ``frozen=`` (never trained). Its gradients are the slices of ``jax.grad``
for what each phase trains, its steps equal the dense compact step's over a whole cycle with
one compiled program, and (by behaviour, no timing) it skips the work nothing needs: no layer
backward below the lowest active layer when the stack's input is not differentiated, none at
all in the head's phase."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import omgd_jax

LAYERS = r"^blocks/"
N, D, H = 4, 8, 16
CONFIGS = {  # name: (units, frozen)
    "rotate": (r"^(embed|head)$", r"^pos$"),  # embedding and head in the traversal
    "frozen-embedding": (r"^head$", r"^(embed|pos)$"),
    "upstream-always": (r"^head$", None),  # embed and pos always active, before the stack
    "frozen-only": (None, r"^(embed|pos)$"),  # no extra unit: layers phases only
}

EXECUTED: list[int] = []  # the layers whose backward ran, in order (the probe's record)


@jax.custom_vjp
def probe(h, idx):
    """Identity on ``h``; its backward records the layer ``idx`` (a side effect, no value)."""
    del idx
    return h


def _probe_fwd(h, idx):
    return h, idx


def _probe_bwd(idx, ct):
    jax.debug.callback(lambda i: EXECUTED.append(int(i)), idx)
    return ct, jnp.zeros_like(idx)


probe.defvjp(_probe_fwd, _probe_bwd)


def layer(p, h):
    h = probe(h, jax.lax.stop_gradient(p["idx"]))
    return h + jnp.tanh(h @ p["w1"] + p["b1"]) @ p["w2"]


def make_params(seed=0):
    k = jax.random.split(jax.random.key(seed), 7)
    return {
        "embed": jax.random.normal(k[0], (D, D)) * 0.5,
        "pos": jax.random.normal(k[1], (D,)) * 0.1,
        "blocks": {
            "w1": jax.random.normal(k[2], (N, D, H)) * 0.3,
            "b1": jax.random.normal(k[3], (N, H)) * 0.1,
            "w2": jax.random.normal(k[4], (N, H, D)) * 0.3,
            "idx": jnp.arange(N, dtype=jnp.float32),
        },
        "ln_f": 1.0 + 0.1 * jax.random.normal(k[5], (D,)),
        "head": jax.random.normal(k[6], (D,)),
    }


def loss_of(params, x, remat=True):
    h = omgd_jax.scan_layers(
        layer, params["blocks"], x @ params["embed"] + params["pos"], remat=remat
    )
    return jnp.mean(((h * params["ln_f"]) @ params["head"]) ** 2)


def make_tx(units, frozen, steps_per_mask=1):
    return omgd_jax.omgd_adamw(
        1e-2,
        weight_decay=0.1,
        granularity="layer",
        layers=LAYERS,
        layers_per_phase=2,
        units=units,
        frozen=frozen,
        steps_per_mask=steps_per_mask,
        key=4,
    )


def picked(name, *specs):
    return any(spec is not None and re.search(spec, name) for spec in specs)


@pytest.mark.parametrize("remat", [True, False])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_grads_are_the_slices_of_jax_grad_in_every_kind_of_phase(config, remat):
    units, frozen = CONFIGS[config]
    params = make_params()
    x = jax.random.normal(jax.random.key(9), (5, D))
    ids = jnp.array([3, 1])
    fun = functools.partial(loss_of, remat=remat)
    full_value, full = jax.value_and_grad(fun)(params, x)
    grad = jax.jit(omgd_jax.lean_value_and_grad(fun, layers=LAYERS, units=units, frozen=frozen))
    plan = omgd_jax._src.layers.plan_layers(params, LAYERS, units, frozen)
    for unit in range(-1, plan.num_extra):
        value, g = grad(params, ids, jnp.int32(unit), x) if units else grad(params, ids, x)
        np.testing.assert_allclose(value, full_value, rtol=1e-6)
        always = {n for n in ("embed", "pos", "ln_f", "head") if not picked(n, units, frozen)}
        for name in ("embed", "pos", "ln_f", "head"):
            on = name in always or (unit >= 0 and plan.extra_names[unit] == name)
            want = full[name] if on else np.zeros_like(full[name])
            np.testing.assert_allclose(g[name], want, rtol=1e-5, atol=1e-7, err_msg=name)
        for name in ("w1", "b1", "w2"):  # the [gamma, ...] views: trained in a layers phase
            want = full["blocks"][name][ids] if unit < 0 else np.zeros_like(g["blocks"][name])
            np.testing.assert_allclose(g["blocks"][name], want, rtol=1e-5, atol=1e-7)


def test_without_units_and_frozen_the_gradient_is_todays():
    """units=None, frozen=None: the same function as before (bit for bit)."""
    params = make_params()
    x = jax.random.normal(jax.random.key(2), (5, D))
    ids = jnp.array([2, 0])
    a = jax.jit(omgd_jax.lean_value_and_grad(loss_of, layers=LAYERS))(params, ids, x)
    b = jax.jit(omgd_jax.lean_value_and_grad(loss_of, layers=LAYERS, units=None, frozen=None))(
        params, ids, x
    )
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize(
    "config,remat,microbatches",
    [
        ("rotate", True, None),
        ("rotate", False, None),
        ("rotate", True, 2),
        ("frozen-embedding", True, None),
        ("upstream-always", True, None),
        ("frozen-only", True, None),
    ],
)
def test_lean_step_equals_the_dense_compact_step_over_a_cycle(config, remat, microbatches):
    units, frozen = CONFIGS[config]
    tx = make_tx(units, frozen)
    fun = functools.partial(loss_of, remat=remat)
    lean = jax.jit(
        omgd_jax.lean_train_step(
            fun, tx, layers=LAYERS, units=units, frozen=frozen, microbatches=microbatches
        ),
        donate_argnums=(0, 1),
    )
    dense = jax.jit(omgd_jax.train_step(fun, tx, microbatches=microbatches))
    params = make_params()
    pl, sl = jax.tree.map(jnp.copy, params), tx.init(params)
    pd, sd = params, tx.init(params)
    kinds = set()
    for t in range(8):  # two cycles of M = 2 layer groups + E units, one step a phase
        shape = (4, D) if microbatches is None else (microbatches, 2, D)
        x = jax.random.normal(jax.random.key(t), shape)
        kinds.add(int(omgd_jax.active_unit(sl)) if units else -1)
        before = jax.tree.map(np.asarray, pl)
        pl, sl, vl = lean(pl, sl, x)
        pd, sd, vd = dense(pd, sd, x)
        np.testing.assert_allclose(vl, vd, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(pl), jax.tree.leaves(pd), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        if frozen is not None:  # frozen leaves: bit for bit unchanged
            for name in ("embed", "pos"):
                if re.search(frozen, name):
                    np.testing.assert_array_equal(pl[name], before[name])
    extra = {"rotate": 2, "frozen-only": 0}.get(config, 1)
    assert kinds == set(range(-1, extra))  # layers, and every extra unit's phase, were run
    assert lean._cache_size() == 1  # one compiled program for every phase


@functools.cache
def _lean_grad(config, remat):  # one compiled program per configuration: ids and unit traced
    units, frozen = CONFIGS[config]
    fun = functools.partial(loss_of, remat=remat)
    return jax.jit(omgd_jax.lean_value_and_grad(fun, layers=LAYERS, units=units, frozen=frozen))


def executed_backward(config, ids, unit, remat=True):
    """The layers whose backward the lean gradient runs, last to first."""
    units, _ = CONFIGS[config]
    f = _lean_grad(config, remat)
    x = jnp.ones((3, D))
    extra = (jnp.int32(unit),) if units else ()
    jax.block_until_ready(f(make_params(), jnp.asarray(ids), *extra, x))  # compile
    EXECUTED.clear()
    jax.block_until_ready(f(make_params(), jnp.asarray(ids), *extra, x))
    jax.effects_barrier()
    out = list(EXECUTED)
    EXECUTED.clear()
    return out


@pytest.mark.parametrize("remat", [True, False])
def test_no_layer_backward_below_the_lowest_active_layer_nor_in_the_heads_phase(remat):
    """rotate: the embedding is an extra unit and pos frozen, so in a layers phase nothing
    needs the stack's input cotangent: layers 3..lowest run their backward, those below none.
    The head's phase runs no layer backward; the embedding's runs all of them."""
    extra = ("embed", "head")  # the unit order of r"^(embed|head)$" (leaf order)
    assert executed_backward("rotate", [3, 2], -1, remat) == [3, 2]
    assert executed_backward("rotate", [1, 3], -1, remat) == [3, 2, 1]
    assert executed_backward("rotate", [0, 2], -1, remat) == [3, 2, 1, 0]
    assert executed_backward("rotate", [3, 2], extra.index("head"), remat) == []
    assert executed_backward("rotate", [3, 2], extra.index("embed"), remat) == [3, 2, 1, 0]
    # the head unit, the embedding frozen: the same skip in a layers phase
    assert executed_backward("frozen-embedding", [2, 3], -1, remat) == [3, 2]
    assert executed_backward("frozen-embedding", [2, 3], 0, remat) == []
    # something always active before the stack (pos, embed): its input cotangent is needed
    assert executed_backward("upstream-always", [3, 2], -1, remat) == [3, 2, 1, 0]
    assert executed_backward("upstream-always", [3, 2], 0, remat) == [3, 2, 1, 0]
    # frozen= alone (no units): the layers phases skip below the lowest active layer too
    assert executed_backward("frozen-only", [3, 1], -1, remat) == [3, 2, 1]


def test_one_program_and_the_heads_phase_has_no_weight_gradient_of_a_block():
    """The compiled step serves every phase, and the jaxpr of the head's branch holds no
    backward loop over the blocks (the forward's scan only)."""
    units, frozen = CONFIGS["rotate"]
    grad = omgd_jax.lean_value_and_grad(loss_of, layers=LAYERS, units=units, frozen=frozen)
    jaxpr = jax.make_jaxpr(grad)(make_params(), jnp.array([0, 1]), jnp.int32(0), jnp.ones((3, D)))
    (switch,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
    layers_b, embed_b, head_b = switch.params["branches"]

    def loops(j, kind):
        return sum(e.primitive.name == kind for e in j.jaxpr.eqns)

    assert (loops(head_b, "scan"), loops(head_b, "while")) == (1, 0)  # the forward only
    # the embedding's: the forward and one backward loop over every layer (input cotangents)
    assert (loops(embed_b, "scan"), loops(embed_b, "while")) == (2, 0)
    # the layers': the forward, and a loop above each of the 2 active layers (none below the
    # lowest: nothing upstream of the stack is trained in this phase)
    assert (loops(layers_b, "scan"), loops(layers_b, "while")) == (1, 2)


def test_active_unit_needs_a_state_with_units():
    tx = make_tx(None, None)
    with pytest.raises(ValueError, match="active_unit: opt_state must hold"):
        omgd_jax.active_unit(tx.init(make_params()))
    step = omgd_jax.lean_train_step(loss_of, tx, layers=LAYERS, units=r"^head$")
    with pytest.raises(ValueError, match="built with units="):
        jax.eval_shape(step, make_params(), tx.init(make_params()), jnp.ones((3, D)))
