"""Checks that need 8 devices; `tests/test_sharding.py` runs this module in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the flag must be set before jax starts).

Figures asserted here (8 CPU devices, mesh axis "fsdp"):
* element compact, M = 4: per-device state bytes <= 1/4 of sharded AdamW's + 64 B of scalars;
* layer compact, gamma = 2 of 4 layers: per-device block state exactly 1/2 of sharded AdamW's;
* every transformation of the library, jitted on 2 data-parallel replicas x 4 FSDP shards ==
  one device, rtol 1e-5 atol 1e-6 (float32 reductions in another order; SVD-based ones
  rtol 1e-4 atol 1e-5); the lean step with a batch-sharded loss: rtol 1e-4 atol 1e-4.
  Run under XLA -O0 (faster compiles).
* MoFaSGD on a stack split along its layers: Explicit axes, factors split the same way (1/8 of
  their bytes per device); Auto axes, replicated; updates == one device, rtol 1e-4 atol 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import omgd_jax

pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason="needs 8 devices")
AXIS_TYPES = [AxisType.Auto, AxisType.Explicit]
LAYERS = r"^blocks/"


def mesh_of(axis_type):
    return jax.make_mesh((8,), ("fsdp",), axis_types=(axis_type,))


def tree(seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    return {
        "blocks": {"k": jax.random.normal(keys[0], (4, 8, 16))},
        "wte": jax.random.normal(keys[1], (32, 8)),
        "head": jax.random.normal(keys[2], (8, 16)),
        "b": jax.random.normal(keys[3], (8,)),
    }


FSDP_SPECS = {"blocks": {"k": P(None, None, "fsdp")}, "wte": P("fsdp", None),
              "head": P(None, "fsdp"), "b": P()}  # fmt: skip


def place(x, mesh, specs):
    return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), x, specs)


def per_device_bytes(state) -> int:
    """Bytes of ``state`` on the most loaded device."""
    totals: dict = {}
    for x in jax.tree.leaves(state):
        for shard in x.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return max(totals.values())


def spec_of(x, ndim=None):
    """The PartitionSpec of ``x`` with trailing Nones dropped (P('a', None) == P('a'))."""
    spec = list(x.sharding.spec)
    while spec and spec[-1] is None:
        spec.pop()
    return tuple(spec)


# ------------------------------------------------------------------- compact state stays sharded
@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=lambda t: t.name)
def test_element_windows_follow_the_parameters_sharding(axis_type):
    mesh = mesh_of(axis_type)
    with jax.set_mesh(mesh):
        params = place(tree(), mesh, FSDP_SPECS)
        tx = omgd_jax.omgd(optax.adam(1e-2), 4, 2, state="compact")
        state = tx.init(params)
        mu = optax.tree.get(state, "mu")
        # Every window keeps its leaf's PartitionSpec: shape (G_0 c, G_1, ...).
        assert mu["wte"].shape == (8 * 8, 1) and spec_of(mu["wte"]) == ("fsdp",)
        assert mu["head"].shape == (8 * 16 // 8 // 4, 8) and spec_of(mu["head"]) == (None, "fsdp")
        assert mu["blocks"]["k"].shape == (4 * 8 * 2 // 4, 1, 8)
        assert spec_of(mu["blocks"]["k"]) == (None, None, "fsdp")
        shardings = [x.sharding for x in jax.tree.leaves(state)]
        update = jax.jit(tx.update)
        for t in range(5):  # across a phase change (K = 2) the shardings do not move
            grads = place(tree(10 + t), mesh, FSDP_SPECS)
            updates, state = update(grads, state, params)
            params = optax.apply_updates(params, updates)
            for a, b in zip(jax.tree.leaves(state), shardings, strict=True):
                assert a.sharding.is_equivalent_to(b, a.ndim)
            for u, s in zip(jax.tree.leaves(updates), jax.tree.leaves(FSDP_SPECS), strict=True):
                assert u.sharding.is_equivalent_to(NamedSharding(mesh, s), u.ndim)
        adamw = optax.adamw(1e-2).init(params)
        assert per_device_bytes(state) <= per_device_bytes(adamw) / 4 + 64
        # Shapes and shardings of init under jit / eval_shape (Explicit: visible in the types).
        if axis_type == AxisType.Explicit:
            abstract = optax.tree.get(jax.eval_shape(tx.init, params), "mu")
            for a, b in zip(jax.tree.leaves(abstract), jax.tree.leaves(mu), strict=True):
                assert a.shape == b.shape and a.sharding.spec == b.sharding.spec


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=lambda t: t.name)
def test_layer_view_keeps_the_non_layer_axes_sharding(axis_type):
    mesh = mesh_of(axis_type)
    with jax.set_mesh(mesh):
        params = place(tree(), mesh, FSDP_SPECS)
        tx = omgd_jax.omgd_adamw(
            1e-2, granularity="layer", layers=LAYERS, layers_per_phase=2, steps_per_mask=2
        )
        state = tx.init(params)
        update = jax.jit(tx.update)
        for t in range(3):
            updates, state = update(place(tree(10 + t), mesh, FSDP_SPECS), state, params)
            params = optax.apply_updates(params, updates)
        active = optax.tree.get(state, "omgd_active_state")[0]
        dense = optax.tree.get(state, "omgd_dense_state")[0]
        assert active.mu["blocks"]["k"].shape == (2, 8, 16)
        assert spec_of(active.mu["blocks"]["k"]) == (None, None, "fsdp")
        assert spec_of(dense.mu["wte"]) == ("fsdp",)
        block_bytes = per_device_bytes((active.mu["blocks"], active.nu["blocks"]))
        adamw = optax.adamw(1e-2).init(params)[0]
        assert block_bytes * 2 == per_device_bytes((adamw.mu["blocks"], adamw.nu["blocks"]))
        assert per_device_bytes(state) < per_device_bytes(adamw)


def test_sharded_bands_update_as_on_one_device_with_the_same_grid():
    """The values: 8 devices == one device fed the same state (so the same shard grid)."""
    mesh = mesh_of(AxisType.Auto)
    tx = omgd_jax.omgd(optax.adam(1e-2), 4, 1, state="compact")
    params = place(tree(), mesh, FSDP_SPECS)
    state = tx.init(params)
    host = jax.device_get((params, state))
    one = jax.device_put(host, jax.devices()[0])
    update = jax.jit(tx.update)
    for t in range(6):
        g = tree(20 + t)
        u8, state = update(place(g, mesh, FSDP_SPECS), state, params)
        u1, one_state = update(jax.device_put(g, jax.devices()[0]), one[1], one[0])
        params = optax.apply_updates(params, u8)
        one = (optax.apply_updates(one[0], u1), one_state)
        if t == 3:  # one cycle of the 4 bands: every coordinate has moved once
            moved = jax.tree.map(lambda a, b: np.asarray(a != b).mean(), params, tree())
            assert all(m == 1 for m in jax.tree.leaves(moved)), moved
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, one[0]
    )


ROW_SPECS = {"blocks": {"k": P(None, "fsdp", None)}, "wte": P("fsdp", None),
             "head": P("fsdp", None), "b": P("fsdp")}  # fmt: skip


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=lambda t: t.name)
def test_strided_bands_are_the_same_on_eight_devices_and_on_one(axis_type):
    """layout="strided": a fresh run on 8 devices (every leaf split along a non-layer axis into
    shards of a multiple of M = 4 rows, or along the columns) trains what a fresh run on one
    device trains, over 12 steps (3 cycles); the update moves no data (no collective in its
    HLO) and every window is split 8 ways like its leaf."""
    mesh = mesh_of(axis_type)
    tx = omgd_jax.omgd_adamw(1e-2, num_masks=4, steps_per_mask=1, layout="strided")
    big = {"blocks": {"k": jax.random.normal(jax.random.key(1), (4, 64, 16))},
           "wte": jax.random.normal(jax.random.key(2), (64, 8)),
           "head": jax.random.normal(jax.random.key(3), (32, 16)),
           "b": jax.random.normal(jax.random.key(4), (32,))}  # fmt: skip
    grads = [jax.tree.map(lambda x, t=t: jnp.sin(x * (t + 1)), big) for t in range(12)]
    params = place(big, mesh, ROW_SPECS)
    state = tx.init(params)
    mu = optax.tree.get(state, "mu")
    for leaf, spec in zip(jax.tree.leaves(mu), jax.tree.leaves(ROW_SPECS), strict=True):
        stripped = list(spec)
        while stripped and stripped[-1] is None:
            stripped.pop()
        assert spec_of(leaf) == tuple(stripped), (leaf.shape, leaf.sharding.spec, spec)
        assert per_device_bytes(leaf) * 8 == leaf.nbytes  # split 8 ways, nothing replicated
    update = jax.jit(tx.update)
    hlo = update.lower(place(grads[0], mesh, ROW_SPECS), state, params).compile().as_text()
    for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
        assert op not in hlo, op
    one = jax.device_put(big, jax.devices()[0])
    one_state = tx.init(one)
    for g in grads:
        u, state = update(place(g, mesh, ROW_SPECS), state, params)
        params = optax.apply_updates(params, u)
        u1, one_state = update(jax.device_put(g, jax.devices()[0]), one_state, one)
        one = optax.apply_updates(one, u1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, one)
    assert not np.allclose(params["wte"], big["wte"])  # it trained


# ------------------------------------------------------------- every form of the library
def factories():
    """(name, transformation) for every optimizer-like factory of omgd_jax.__all__."""
    layer = dict(granularity="layer", layers=LAYERS, layers_per_phase=2)
    adam = optax.adam(1e-2)
    return [
        ("omgd_mask", optax.chain(omgd_jax.omgd_mask(4, 2), optax.adam(1e-2))),
        ("omgd_mask-layer", optax.chain(omgd_jax.omgd_mask(steps_per_mask=2, **layer), adam)),
        ("omgd-compact-element", omgd_jax.omgd(adam, 4, 2)),
        ("omgd-compact-layer", omgd_jax.omgd(adam, steps_per_mask=2, **layer)),
        ("omgd-frozen-element", omgd_jax.omgd(adam, 4, 2, state="frozen")),
        ("omgd-frozen-tensor", omgd_jax.omgd(adam, 2, 2, state="frozen", granularity="tensor")),
        ("omgd-frozen-layer", omgd_jax.omgd(adam, steps_per_mask=2, state="frozen", **layer)),
        ("omgd_adamw", omgd_jax.omgd_adamw(1e-2, num_masks=4, steps_per_mask=2)),
        ("omgd_adamw-layer", omgd_jax.omgd_adamw(1e-2, steps_per_mask=2, **layer)),
        ("lisa", omgd_jax.lisa(1e-2, layers=LAYERS, layers_per_phase=2, steps_per_mask=2)),
        ("lisa_wor", omgd_jax.lisa_wor(1e-2, layers=LAYERS, layers_per_phase=2, steps_per_mask=2)),
        ("iid_tensor_mask", optax.chain(omgd_jax.iid_tensor_mask(2, 2), optax.adam(1e-2))),
        ("iid_element_mask", optax.chain(omgd_jax.iid_element_mask(2, 2), optax.adam(1e-2))),
        ("galore", omgd_jax.galore(1e-2, rank=2, update_proj_gap=2)),
        ("golore", omgd_jax.golore(1e-2, rank=2, update_proj_gap=2)),
        ("sift", omgd_jax.sift(1e-2, 0.25)),
        ("scale_by_sift", optax.chain(omgd_jax.scale_by_sift(0.25), optax.scale(-1e-2))),
        (
            "scale_by_galore",
            optax.chain(omgd_jax.scale_by_galore(2, update_proj_gap=2), optax.scale(-1e-2)),
        ),
        ("skip_update", omgd_jax.skip_update(adam, 0.5)),
        ("skip_update_adamw", omgd_jax.skip_update_adamw(1e-2, 0.5)),
        ("magma", omgd_jax.magma(adam, 0.5)),
        ("magma_adamw", omgd_jax.magma_adamw(1e-2, 0.5)),
        ("mofasgd", omgd_jax.mofasgd(1e-2, rank=2)),
        (
            "scale_by_mofasgd",
            optax.partition(
                {"m": omgd_jax.scale_by_mofasgd(rank=2), "v": optax.sgd(1e-2)},
                lambda p: jax.tree.map(lambda x: "m" if x.ndim > 1 else "v", p),
            ),
        ),
    ]


FACTORIES = factories()
SVD_BASED = ("galore", "golore", "mofasgd", "scale_by_mofasgd", "scale_by_galore")


def test_every_transformation_of_the_library_is_listed():
    """The list above covers every transformation factory in omgd_jax.__all__ (the lean step
    has a test of its own below)."""
    covered = {name.split("-")[0] for name, _ in FACTORIES}
    helpers = {"active_layers", "active_unit", "add_to_layers", "apply_layer_updates",
               "gather_layers", "joint_traversal", "layer_view", "lean_train_step",
               "lean_value_and_grad", "scan_layers", "scatter_layers", "static_args",
               "stiefel_projector", "omgd_mask", "train_step"}  # fmt: skip
    public = {n for n in omgd_jax.__all__ if n[0].islower()}
    assert public - helpers <= covered, public - helpers - covered


@pytest.mark.parametrize("name, tx", FACTORIES, ids=[n for n, _ in FACTORIES])
def test_eight_devices_data_parallel_and_fsdp_equal_one_device(name, tx):
    """Jitted on 8 devices as 2 data-parallel replicas of a 4-way FSDP split (every value
    replicated along "data" and split along "fsdp" as FSDP_SPECS say) == one device.

    One program holds both kinds of placement, so each transformation compiles once per mesh.
    The one-device run starts from the sharded run's initial state moved to one device (for
    compact element state that carries the shard grid, so the same bands)."""
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    grads = [tree(30 + t) for t in range(4)]
    tol = dict(rtol=1e-4, atol=1e-5) if name in SVD_BASED else dict(rtol=1e-5, atol=1e-6)
    params = place(tree(), mesh, FSDP_SPECS)
    state = tx.init(params)
    one_params, one_state = jax.device_put(jax.device_get((params, state)), jax.devices()[0])
    update = jax.jit(tx.update)
    for g in grads:
        u, state = update(place(g, mesh, FSDP_SPECS), state, params)
        params = optax.apply_updates(params, u)
        u1, one_state = update(jax.device_put(g, jax.devices()[0]), one_state, one_params)
        one_params = optax.apply_updates(one_params, u1)
    for x, spec in zip(jax.tree.leaves(params), jax.tree.leaves(FSDP_SPECS), strict=True):
        split = 4 if any(spec) else 1  # the placement held: each device a quarter, or all
        assert all(d.data.nbytes * split == x.nbytes for d in x.addressable_shards), spec
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), params, one_params)
    assert not np.allclose(params["wte"], tree()["wte"])  # it trained


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=lambda t: t.name)
def test_mofasgd_factors_of_a_stack_split_along_its_layers(axis_type):
    """FSDP over the layer axis of a stacked [8, 16, 12] weight, init and update jitted.
    Explicit axes: U, S and V (and the update) split along the layer axis like the weight, each
    device holding 1/8 of the factors. Auto axes: the shardings are not visible while tracing,
    so XLA's choice: replicated (a jitted train step's in/out shardings place them). Either
    way the updates equal one device's, rtol 1e-4 atol 1e-5."""
    mesh = mesh_of(axis_type)
    split = NamedSharding(mesh, P("fsdp", None, None))
    w = jax.random.normal(jax.random.key(0), (8, 16, 12))
    grads = [jax.random.normal(jax.random.key(t), (8, 16, 12)) for t in range(1, 4)]
    tx = omgd_jax.scale_by_mofasgd(rank=3)
    one_state, update = jax.jit(tx.init)({"k": w}), jax.jit(tx.update)
    with jax.set_mesh(mesh):
        params = {"k": jax.device_put(w, split)}
        state, outs = jax.jit(tx.init)(params), []
        for g in grads:
            u, state = update({"k": jax.device_put(g, split)}, state, params)
            u1, one_state = update({"k": g}, one_state)
            np.testing.assert_allclose(u["k"], u1["k"], rtol=1e-4, atol=1e-5)
            outs.append(np.asarray(u["k"]))
    assert not np.allclose(outs[0], outs[-1])  # the momentum moves
    factors = (state.mofasgd_u[0], state.mofasgd_s[0], state.mofasgd_v[0])
    assert [x.shape for x in factors] == [(8, 16, 3), (8, 3), (8, 12, 3)]
    expected = ("fsdp",) if axis_type == AxisType.Explicit else ()
    assert [spec_of(x) for x in (*factors, u["k"])] == [expected] * 4
    total = sum(x.nbytes for x in factors)
    share = 8 if axis_type == AxisType.Explicit else 1
    assert per_device_bytes(factors) == total // share


def test_lean_step_on_eight_devices_equals_one_device():
    mesh = mesh_of(AxisType.Auto)
    tx = omgd_jax.omgd_adamw(1e-2, granularity="layer", layers=LAYERS, layers_per_phase=2,
                             steps_per_mask=1)  # fmt: skip

    def loss(p, x):
        h = omgd_jax.scan_layers(
            lambda layer, h: jnp.tanh(h @ layer["k"] @ layer["k"].T),
            p["blocks"],
            x @ p["wte"].T @ p["wte"],
        )
        return jnp.mean((h @ p["head"]) ** 2) + jnp.sum(p["b"] ** 2)

    step = jax.jit(omgd_jax.lean_train_step(loss, tx, layers=LAYERS))
    x = jax.random.normal(jax.random.key(1), (16, 8))
    out = []
    for specs, xs in ((FSDP_SPECS, P("fsdp")), (jax.tree.map(lambda _: P(), FSDP_SPECS), None)):
        if xs is None:  # one device
            params = jax.device_put(tree(), jax.devices()[0])
            batch = jax.device_put(x, jax.devices()[0])
        else:
            params = place(tree(), mesh, specs)
            batch = jax.device_put(x, NamedSharding(mesh, xs))
        state = tx.init(params)
        for _ in range(4):
            params, state, value = step(params, state, batch)
        out.append(params)
    # atol 1e-4 (a hundredth of one step of lr 1e-2): Adam divides by sqrt(v), which amplifies
    # the reduction-order noise of near-zero gradients of the batch-sharded loss.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), *out)


# ---------------------------------------------------- nnx.eval_shape(nnx.Optimizer(...)) on a mesh
class Block(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(8, 8, rngs=rngs)


class Model(nnx.Module):
    def __init__(self, rngs):
        @nnx.split_rngs(splits=4)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(rngs)

        self.blocks = make(rngs)
        self.head = nnx.Linear(8, 16, rngs=rngs)
        self.wte = nnx.Embed(32, 8, rngs=rngs)


@pytest.mark.parametrize("name, tx", FACTORIES, ids=[n for n, _ in FACTORIES])
def test_nnx_eval_shape_of_an_optimizer_under_a_mesh(name, tx):
    """How MaxText-style loops derive the state's shardings: abstract, under `jax.set_mesh`."""
    with jax.set_mesh(mesh_of(AxisType.Auto)):
        model = Model(nnx.Rngs(0))
        abstract = nnx.eval_shape(lambda: nnx.Optimizer(model, tx, wrt=nnx.Param))
        concrete = nnx.Optimizer(model, tx, wrt=nnx.Param)
    shapes = lambda o: [x.shape for x in jax.tree.leaves(nnx.state(o, nnx.OptState))]
    assert shapes(abstract) == shapes(concrete)


def test_example_batch_not_divisible_by_the_devices_is_refused(tmp_path):
    from examples.gpt2.train import train
    from tests.examples.test_gpt2_train import _cfg

    data = tmp_path / "data"
    data.mkdir()
    np.arange(4000, dtype=np.uint16).__mod__(64).astype(np.uint16).tofile(data / "train.bin")
    np.arange(1000, dtype=np.uint16).__mod__(64).astype(np.uint16).tofile(data / "val.bin")
    with pytest.raises(SystemExit, match="--batch-size 4 is not divisible by the 8 devices"):
        train(_cfg(data, tmp_path / "out", steps=1, batch_size=4))
    assert not (tmp_path / "out").exists()  # nothing written
