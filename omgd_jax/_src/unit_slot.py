"""One shared buffer for the inner state of the extra traversal units (``units=``).

Only the active unit's inner state is ever read: a unit's state restarts whenever its phase
begins, so what the other units' states hold is dead. The compact state therefore keeps one
*slot*: flat buffers, one per state-leaf position (a unit's leaves of a dtype, largest first),
each as long as the largest leaf any unit puts there, and a unit's phase reads its state out
of the slot (reshapes, or static slices for a smaller unit) and writes it back. The state of E
units costs what the largest one's does, not their sum (Llama-3.1-8B: the embedding's, not the
embedding's and the head's), and a unit that fills the buffers is updated in place.

The same layouts pack a gradient or an update handed out of a branch (``flat=True``: one
buffer per dtype, a unit's leaves one after another).

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
    buffer: str  # the buffer this leaf lives in: "<dtype name>:<position>"
    offset: int  # its first element in that buffer
    shape: tuple[int, ...]


class SlotLayout(NamedTuple):
    """Where every leaf of every unit's tree lives in the buffers (static)."""

    treedefs: tuple[Any, ...]  # per unit: the treedef of its tree
    entries: tuple[tuple[SlotEntry, ...], ...]  # per unit: one entry per leaf
    sizes: tuple[tuple[str, int], ...]  # (buffer name, length), sorted by name


def buffer_dtype(name: str) -> str:
    """The dtype name of buffer ``name`` ("<dtype name>:<position>")."""
    return name.split(":")[0]


def slot_layout(init, unit_trees, *, flat: bool = False, stacked=()) -> SlotLayout:
    """The layout of the trees ``init(tree)`` of ``unit_trees`` (shapes only: nothing runs).

    Default (the units' inner states): one buffer per *position*, a unit's leaves of one
    dtype, largest first, taking positions 0, 1, ... of that dtype, each buffer as long as
    the largest leaf any unit puts there. A leaf that fills its buffer is read and written
    whole (a reshape), so an elementwise inner optimizer updates the slot in place; leaves at
    offsets of one buffer are written with update-slices, for which XLA copies the buffer.

    ``flat=True`` (a gradient or an update handed out of a branch, written once): one buffer
    per dtype, a unit's leaves one after another, as long as the largest unit's.

    ``stacked``: arrays whose states ``init(x)`` share the buffers with the units' (an
    elementwise inner optimizer's, for the layer view, which is trained in other phases than
    any unit): unit ``len(unit_trees) + k`` is ``stacked[k]``'s state, its leaf at a position
    in the buffer of that position after ``stacked[k - 1]``'s. Each is read and written with
    slices and update-slices one array at a time, which XLA does in place when the read is
    materialised first (`omgd_jax._src.ordering.materialise`).

    Raises ValueError for a leaf that cannot live in a numeric buffer (a PRNG key).
    """
    treedefs, entries, sizes = [], [], {}
    for tree in unit_trees:
        leaves, treedef = _state_leaves(init, tree)
        dtype = [jnp.dtype(x.dtype).name for x in leaves]
        size = [math.prod(x.shape) for x in leaves]
        order = range(len(leaves))
        if not flat:
            order = sorted(order, key=lambda i: (dtype[i], -size[i], i))
        unit, used = [None] * len(leaves), {}
        for i in order:
            k = used.get(dtype[i], 0)
            name, offset = (f"{dtype[i]}:0", k) if flat else (f"{dtype[i]}:{k}", 0)
            used[dtype[i]] = k + (size[i] if flat else 1)
            unit[i] = SlotEntry(name, offset, tuple(leaves[i].shape))
            sizes[name] = max(sizes.get(name, 0), offset + size[i])
        treedefs.append(treedef)
        entries.append(tuple(unit))
    ends = {}  # the stacked arrays' states: one after another in the positions' buffers
    for x in stacked:
        leaves, treedef = _state_leaves(init, x)
        dtype = [jnp.dtype(y.dtype).name for y in leaves]
        size = [math.prod(y.shape) for y in leaves]
        unit, used = [None] * len(leaves), {}
        for i in sorted(range(len(leaves)), key=lambda i: (dtype[i], -size[i], i)):
            k = used.get(dtype[i], 0)
            used[dtype[i]] = k + 1
            name = f"{dtype[i]}:{k}"
            offset = ends.get(name, 0)
            ends[name] = offset + size[i]
            unit[i] = SlotEntry(name, offset, tuple(leaves[i].shape))
            sizes[name] = max(sizes.get(name, 0), ends[name])
        treedefs.append(treedef)
        entries.append(tuple(unit))
    # at least one element a buffer: Orbax cannot checkpoint zero-size arrays
    return SlotLayout(
        tuple(treedefs), tuple(entries), tuple((k, max(n, 1)) for k, n in sorted(sizes.items()))
    )


def _state_leaves(init, tree):
    """(leaves, treedef) of ``init(tree)``'s shapes; ValueError for a PRNG key among them."""
    leaves, treedef = jax.tree.flatten(jax.eval_shape(init, tree))
    for leaf in leaves:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            raise ValueError(
                "omgd: units= keeps the extra units' inner state in one shared buffer, "
                f"which cannot hold the PRNG key of shape {leaf.shape} in the inner "
                "optimizer's state; use an inner optimizer without keys in its state"
            )
    return leaves, treedef


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
        flat=True,
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
    return {name: jnp.zeros((n,), buffer_dtype(name)) for name, n in layout.sizes}


def slot_matches(layout: SlotLayout, slot) -> bool:
    """Whether ``slot`` has the buffers (names, lengths, dtypes) ``layout`` needs."""
    if not isinstance(slot, dict) or sorted(slot) != [name for name, _ in layout.sizes]:
        return False
    return all(
        tuple(slot[name].shape) == (n,) and jnp.dtype(slot[name].dtype).name == buffer_dtype(name)
        for name, n in layout.sizes
    )


def read_unit(layout: SlotLayout, slot, unit: int):
    """Unit ``unit``'s tree, read out of the buffers."""
    leaves = []
    for e in layout.entries[unit]:
        buf, n = slot[e.buffer], math.prod(e.shape)
        whole = e.offset == 0 and buf.shape[0] == n
        leaves.append((buf if whole else buf[e.offset : e.offset + n]).reshape(e.shape))
    return jax.tree.unflatten(layout.treedefs[unit], leaves)


def at_offsets(layout: SlotLayout, unit: int) -> list[bool]:
    """Per leaf of unit ``unit``'s tree (flattened): whether it is read with a slice and
    written with an update-slice (not a whole buffer). XLA does such a write in place only
    when the read is materialised before it (`omgd_jax._src.ordering.materialise`);
    otherwise it copies the buffer."""
    sizes = dict(layout.sizes)
    return [
        not (e.offset == 0 and sizes[e.buffer] == math.prod(e.shape)) for e in layout.entries[unit]
    ]


def write_unit(layout: SlotLayout, slot, unit: int, tree) -> dict[str, jax.Array]:
    """The buffers with unit ``unit``'s tree written in (the rest as it was)."""
    out = dict(slot)
    leaves = layout.treedefs[unit].flatten_up_to(tree)
    for e, x in zip(layout.entries[unit], leaves, strict=True):
        flat = jnp.reshape(x, (-1,)).astype(buffer_dtype(e.buffer))
        if e.offset == 0 and flat.shape == out[e.buffer].shape:  # whole: no update-slice
            out[e.buffer] = flat
        else:
            out[e.buffer] = jax.lax.dynamic_update_slice(out[e.buffer], flat, (e.offset,))
    return out


def select_units(layout: SlotLayout, unit, trees) -> dict[str, jax.Array]:
    """The buffers holding unit ``unit``'s tree of ``trees`` (one tree per unit, laid out by
    ``layout``), zeros for no unit: one elementwise select over the units' flattened trees,
    so only the output is a buffer of the layout's length."""
    unit = jnp.asarray(unit, jnp.int32)
    out = {}
    for name, n in layout.sizes:
        picked = jnp.zeros((n,), buffer_dtype(name))
        for e, tree in enumerate(trees):
            leaves = layout.treedefs[e].flatten_up_to(tree)
            parts = sorted(
                (
                    (entry.offset, jnp.reshape(x, (-1,)).astype(buffer_dtype(name)))
                    for x, entry in zip(leaves, layout.entries[e], strict=True)
                    if entry.buffer == name
                ),
                key=lambda part: part[0],
            )
            if not parts:
                continue
            flat = [x for _, x in parts]
            used = parts[-1][0] + flat[-1].shape[0]
            flat = jnp.concatenate(flat + [jnp.zeros((n - used,), buffer_dtype(name))])
            picked = jnp.where(unit == e, flat, picked)
        out[name] = picked
    return out
