"""One shared buffer for the inner state of the extra traversal units (``units=``).

Only the active unit's inner state is ever read: a unit's state restarts whenever its phase
begins, so what the other units' states hold is dead. The compact state therefore keeps one
*slot* per dtype, a flat buffer as long as the largest unit's state of that dtype, and a
unit's phase reads its state out of the slot (static slices, reshaped) and writes it back.
The state of E units costs what the largest one's does, not their sum (Llama-3.1-8B: the
embedding's, not the embedding's and the head's).

The layout is static: from ``jax.eval_shape(inner.init, unit_tree)`` for every unit, so the
slot works for any inner optimizer whose state is numeric arrays (moments, counts, factors):
each unit's state keeps its own structure, shapes and dtypes.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class SlotEntry(NamedTuple):
    dtype: str  # the slot buffer (its dtype's name) this state leaf lives in
    offset: int  # first element of the leaf in that buffer
    shape: tuple[int, ...]


class SlotLayout(NamedTuple):
    """Where every leaf of every unit's inner state lives in the slot (static)."""

    treedefs: tuple[Any, ...]  # per unit: the treedef of its inner state
    entries: tuple[tuple[SlotEntry, ...], ...]  # per unit: one entry per state leaf
    sizes: tuple[tuple[str, int], ...]  # (dtype name, buffer length), sorted by name


def slot_layout(init, unit_trees) -> SlotLayout:
    """The layout of the states ``init(tree)`` of ``unit_trees`` (shapes only: nothing runs).

    Raises ValueError for a state leaf that cannot live in a numeric buffer (a PRNG key).
    """
    treedefs, entries, sizes = [], [], {}
    for tree in unit_trees:
        leaves, treedef = jax.tree.flatten(jax.eval_shape(init, tree))
        offsets, unit = {}, []
        for leaf in leaves:
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                raise ValueError(
                    "omgd: units= keeps the extra units' inner state in one shared buffer, "
                    f"which cannot hold the PRNG key of shape {leaf.shape} in the inner "
                    "optimizer's state; use an inner optimizer without keys in its state"
                )
            name = jnp.dtype(leaf.dtype).name
            unit.append(SlotEntry(name, offsets.get(name, 0), tuple(leaf.shape)))
            offsets[name] = offsets.get(name, 0) + math.prod(leaf.shape)
        for name, n in offsets.items():
            sizes[name] = max(sizes.get(name, 0), n)
        treedefs.append(treedef)
        entries.append(tuple(unit))
    # at least one element a buffer: Orbax cannot checkpoint zero-size arrays
    return SlotLayout(
        tuple(treedefs), tuple(entries), tuple((k, max(n, 1)) for k, n in sorted(sizes.items()))
    )


def leaves_layout(leaves, unit_of) -> SlotLayout:
    """The layout of the units' own leaves: unit e holds the leaves ``i`` with ``unit_of[i] == e``
    (-1: no unit), in order (to pack a gradient or an update of the active unit)."""
    units = range(max(unit_of, default=-1) + 1)
    return slot_layout(
        lambda t: t,
        [
            [
                jax.ShapeDtypeStruct(x.shape, x.dtype)
                for x, u in zip(leaves, unit_of, strict=True)
                if u == e
            ]
            for e in units
        ],
    )


def unpack_active(layout: SlotLayout, packed, unit, unit_of) -> dict[int, jax.Array]:
    """Leaf index -> its value read out of ``packed`` where its unit is ``unit``, zeros where
    not (elementwise selects, which consumers fuse): the inverse of packing the active unit's
    leaves (``unit_of`` as for `leaves_layout`)."""
    unit = jnp.asarray(unit, jnp.int32)
    out = {}
    for e in range(len(layout.entries)):
        values = iter(read_unit(layout, packed, e))
        for i, u in enumerate(unit_of):
            if u == e:
                x = next(values)
                out[i] = jnp.where(unit == e, x, jnp.zeros((), x.dtype))
    return out


def empty_slot(layout: SlotLayout) -> dict[str, jax.Array]:
    """The slot's buffers, zeros: ``{dtype name: [length]}``."""
    return {name: jnp.zeros((n,), name) for name, n in layout.sizes}


def slot_matches(layout: SlotLayout, slot) -> bool:
    """Whether ``slot`` has the buffers (names, lengths, dtypes) ``layout`` needs."""
    if not isinstance(slot, dict) or sorted(slot) != [name for name, _ in layout.sizes]:
        return False
    return all(
        tuple(slot[name].shape) == (n,) and jnp.dtype(slot[name].dtype).name == name
        for name, n in layout.sizes
    )


def read_unit(layout: SlotLayout, slot, unit: int):
    """Unit ``unit``'s inner state, read out of the slot."""
    leaves = [
        jax.lax.slice(slot[e.dtype], (e.offset,), (e.offset + math.prod(e.shape),)).reshape(e.shape)
        for e in layout.entries[unit]
    ]
    return jax.tree.unflatten(layout.treedefs[unit], leaves)


def write_unit(layout: SlotLayout, slot, unit: int, state) -> dict[str, jax.Array]:
    """The slot with unit ``unit``'s inner state written in (the rest of the slot as it was)."""
    out = dict(slot)
    leaves = layout.treedefs[unit].flatten_up_to(state)
    for e, x in zip(layout.entries[unit], leaves, strict=True):
        flat = jnp.reshape(x, (-1,)).astype(e.dtype)
        out[e.dtype] = jax.lax.dynamic_update_slice(out[e.dtype], flat, (e.offset,))
    return out


def select_units(layout: SlotLayout, unit, trees) -> dict[str, jax.Array]:
    """The buffers holding unit ``unit``'s tree of ``trees`` (one tree per unit, laid out by
    ``layout``), zeros for no unit: one elementwise select over the units' flattened trees,
    so only the output is a buffer of the slot's length."""
    unit = jnp.asarray(unit, jnp.int32)
    out = {}
    for name, n in layout.sizes:
        picked = jnp.zeros((n,), name)
        for e, tree in enumerate(trees):
            leaves = layout.treedefs[e].flatten_up_to(tree)
            parts = [
                jnp.reshape(x, (-1,)).astype(name)
                for x, entry in zip(leaves, layout.entries[e], strict=True)
                if entry.dtype == name
            ]
            used = sum(p.shape[0] for p in parts)
            flat = jnp.concatenate(parts + [jnp.zeros((n - used,), name)])
            picked = jnp.where(unit == e, flat, picked)
        out[name] = picked
    return out
