"""The extra units' shared slot (`omgd_jax/_src/unit_slot.py`): layout, round trips, selects."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omgd_jax._src import unit_slot

MASKED = optax.MaskedNode()


def test_layout_of_adam_states_is_as_long_as_the_largest_unit_hand_checked():
    """wte (5, 3) and head (3,): Adam keeps mu and nu (float32) and a count (int32) per unit;
    the slot holds one buffer per position, as long as the largest leaf put there: 15 + 15
    floats (wte's mu and nu) and one int, not 2 * (15 + 3) and two."""
    trees = [{"wte": jnp.ones((5, 3)), "head": MASKED}, {"wte": MASKED, "head": jnp.ones(3)}]
    layout = unit_slot.slot_layout(optax.adam(0.1).init, trees)
    assert dict(layout.sizes) == {"float32:0": 15, "float32:1": 15, "int32:0": 1}
    slot = unit_slot.empty_slot(layout)
    assert {k: v.shape for k, v in slot.items()} == {
        "float32:0": (15,), "float32:1": (15,), "int32:0": (1,)
    }  # fmt: skip
    # count, mu's leaf, nu's leaf: each at the start of a buffer of its own
    assert [tuple(e) for e in layout.entries[0]] == [
        ("int32:0", 0, ()), ("float32:0", 0, (5, 3)), ("float32:1", 0, (5, 3))
    ]  # fmt: skip
    assert [tuple(e) for e in layout.entries[1]] == [
        ("int32:0", 0, ()), ("float32:0", 0, (3,)), ("float32:1", 0, (3,))
    ]  # fmt: skip
    assert unit_slot.slot_matches(layout, slot)
    assert not unit_slot.slot_matches(layout, {"float32:0": jnp.zeros(15)})
    assert not unit_slot.slot_matches(layout, {**slot, "float32:1": jnp.zeros(14)})
    assert not unit_slot.slot_matches(layout, {**slot, "int32:0": jnp.zeros(1)})  # a float


def test_a_flat_layout_puts_a_units_leaves_one_after_another():
    """The packing of a gradient: wte (5, 3) then b (2,) of one unit at offsets 0 and 15 of
    one buffer as long as the larger unit's 17 elements."""
    trees = [[jnp.ones((5, 3)), jnp.ones(2)], [jnp.ones(4)]]
    layout = unit_slot.slot_layout(lambda t: t, trees, flat=True)
    assert dict(layout.sizes) == {"float32:0": 17}
    assert [tuple(e) for e in layout.entries[0]] == [
        ("float32:0", 0, (5, 3)), ("float32:0", 15, (2,))
    ]  # fmt: skip


def test_stacked_arrays_states_follow_one_another_in_the_units_buffers():
    """The layer view's leaves (2, 3) and (4,) after a unit wte (5, 3) under Adam: leaf k's mu
    and nu at the positions' buffers (float32:0, float32:1) after leaf k - 1's (offsets 0 and
    6), its count in int32:0 after the previous one's; the buffers stay 15 floats long (6 + 4
    fit) and the ints grow to the two counts. Every leaf at offsets of a longer buffer is
    read with a slice (`at_offsets`), and a round trip gives every state back."""
    units = [{"wte": jnp.ones((5, 3))}]
    stacked = [jax.ShapeDtypeStruct((2, 3), jnp.float32), jax.ShapeDtypeStruct((4,), jnp.float32)]
    layout = unit_slot.slot_layout(optax.adam(0.1).init, units, stacked=stacked)
    assert dict(layout.sizes) == {"float32:0": 15, "float32:1": 15, "int32:0": 2}
    assert [tuple(e) for e in layout.entries[1]] == [
        ("int32:0", 0, ()), ("float32:0", 0, (2, 3)), ("float32:1", 0, (2, 3))
    ]  # fmt: skip
    assert [tuple(e) for e in layout.entries[2]] == [
        ("int32:0", 1, ()), ("float32:0", 6, (4,)), ("float32:1", 6, (4,))
    ]  # fmt: skip
    assert unit_slot.at_offsets(layout, 0) == [True, False, False]  # wte fills 15
    assert unit_slot.at_offsets(layout, 2) == [True, True, True]
    slot = unit_slot.empty_slot(layout)
    states = []
    for k, x in enumerate(stacked):
        fresh = optax.adam(0.1).init(jnp.zeros(x.shape))
        state = jax.tree.map(lambda y, k=k: jnp.full(y.shape, k + 1, y.dtype), fresh)
        slot = unit_slot.write_unit(layout, slot, 1 + k, state)
        states.append(state)
    for k, state in enumerate(states):
        got = unit_slot.read_unit(layout, slot, 1 + k)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state), strict=True):
            np.testing.assert_array_equal(a, b)


def test_the_slot_of_equal_sized_units_is_updated_in_place():
    """Two units with the same number of elements (Llama's embedding and head): an Adam step
    of either, under the two-way conds the compact update runs, keeps its moments in the
    donated slot: the compiled step's temporaries are the gradient and the update, not a
    copy of the slot."""
    n = 4096
    trees = [{"e": jnp.ones((64, 64)), "h": MASKED}, {"e": MASKED, "h": jnp.ones((32, 128))}]
    tx = optax.adam(0.1)
    layout = unit_slot.slot_layout(tx.init, trees)
    assert dict(layout.sizes) == {"float32:0": n, "float32:1": n, "int32:0": 1}

    def step(slot, g, unit):
        for e, tree in enumerate(trees):

            def phase(slot, g, e=e, tree=tree):
                key = "e" if e == 0 else "h"
                grads = {**tree, key: g.reshape(tree[key].shape)}
                u, new = tx.update(grads, unit_slot.read_unit(layout, slot, e))
                return unit_slot.write_unit(layout, slot, e, new), u[key].reshape(-1)

            slot, g = jax.lax.cond(unit == e, phase, lambda s, g: (s, g), slot, g)
        return slot, g

    args = (unit_slot.empty_slot(layout), jnp.ones(n), jnp.int32(1))
    compiled = jax.jit(step, donate_argnums=(0,)).lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 2 * n * 4 + 1024  # a copy of the slot would add 2 * n * 4 bytes
    slot, u = jax.jit(step)(*args)
    back = unit_slot.read_unit(layout, slot, 1)
    assert int(back[0].count) == 1
    np.testing.assert_allclose(back[0].mu["h"], 0.1 * np.ones((32, 128)), rtol=1e-6)


def test_a_unit_reads_back_what_it_wrote_and_the_state_keeps_its_structure():
    tx = optax.adam(0.1)
    trees = [{"a": jnp.ones((4, 2)), "b": MASKED}, {"a": MASKED, "b": jnp.ones(3)}]
    layout = unit_slot.slot_layout(tx.init, trees)
    slot = unit_slot.empty_slot(layout)
    state = tx.init(trees[1])
    _, state = tx.update({"a": MASKED, "b": jnp.arange(3.0)}, state)
    slot = jax.jit(lambda s, x: unit_slot.write_unit(layout, s, 1, x))(slot, state)
    back = unit_slot.read_unit(layout, slot, 1)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert int(back[0].count) == 1


def test_select_units_picks_the_phase_unit_and_zeros_in_a_layers_phase():
    trees = [[jnp.full((2, 2), 1.0)], [jnp.full((3,), 2.0)]]
    layout = unit_slot.slot_layout(lambda t: t, trees, flat=True)
    assert dict(layout.sizes) == {"float32:0": 4}
    pick = jax.jit(lambda u: unit_slot.select_units(layout, u, trees))
    np.testing.assert_array_equal(pick(0)["float32:0"], [1, 1, 1, 1])
    np.testing.assert_array_equal(pick(1)["float32:0"], [2, 2, 2, 0])
    np.testing.assert_array_equal(pick(-1)["float32:0"], [0, 0, 0, 0])
    np.testing.assert_array_equal(unit_slot.read_unit(layout, pick(1), 1)[0], [2, 2, 2])


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 3), st.integers(1, 4), st.sampled_from(["f", "i"])),
                 min_size=1, max_size=3),
        min_size=1, max_size=3,
    )
)  # fmt: skip
def test_every_unit_round_trips_whatever_its_shapes_and_dtypes(units):
    """Each unit's tree, written into the buffers and read back, is itself, in either layout.
    By position: a dtype's j-th buffer is as long as the largest j-th largest leaf of that
    dtype; flat: a dtype's one buffer as long as the largest unit's share of that dtype."""
    dtypes = {"f": jnp.float32, "i": jnp.int32}
    trees = [
        [jnp.arange(r * c, dtype=dtypes[d]).reshape((r, c)) + 7 * k for r, c, d in leaves]
        for k, leaves in enumerate(units)
    ]
    for flat in (False, True):
        layout = unit_slot.slot_layout(lambda t: t, trees, flat=flat)
        for name, n in layout.sizes:
            dtype, position = name.split(":")
            of = [sorted((x.size for x in t if x.dtype == jnp.dtype(dtype)), reverse=True)
                  for t in trees]  # fmt: skip
            if flat:
                want = max(sum(sizes) for sizes in of)
            else:
                want = max(s[int(position)] for s in of if len(s) > int(position))
            assert n == max(want, 1)
        for e, tree in enumerate(trees):
            slot = unit_slot.write_unit(layout, unit_slot.empty_slot(layout), e, tree)
            for a, b in zip(unit_slot.read_unit(layout, slot, e), tree, strict=True):
                np.testing.assert_array_equal(a, b)
            picked = unit_slot.select_units(layout, e, trees)
            for a, b in zip(unit_slot.read_unit(layout, picked, e), tree, strict=True):
                np.testing.assert_array_equal(a, b)


def test_a_state_holding_a_prng_key_is_refused_with_a_sentence():
    def init(tree):
        return {"key": jax.random.key(0), "m": jnp.zeros_like(tree)}

    with pytest.raises(ValueError, match="cannot hold the PRNG key"):
        unit_slot.slot_layout(init, [jnp.ones(3)])
