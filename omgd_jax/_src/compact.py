"""``omgd(..., state="compact")``: the inner optimizer runs, and keeps state, on the active share.

The inner state lives in fixed-size buffers, *views* of the active share, and is restarted
whenever the active mask changes (LISA / BAdam). `omgd_compact` is the transformation;
`OmgdCompactState` its state; the rest of the module reads and writes views.

A view keeps the treedef of the parameters, with `optax.MaskedNode` where a leaf takes no part,
so per-leaf callables of the inner optimizer (weight-decay masks, path filters) still apply.

* element granularity: every leaf contributes one window, band ``label`` of its flattened
  coordinates seen as an (M, c) array, c = ceil(n / M). The window keeps the leaf's rank,
  shape (c, 1, ..., 1), so rank-based masks see the same rank.
* sharded leaves (element granularity): a leaf split into a *shard grid* of G_0 x ... x G_{k-1}
  blocks (its `NamedSharding` when `init` sees it: concrete arrays, `jax.ShapeDtypeStruct` with
  a sharding, or tracers under `Explicit` mesh axes) has its bands cut inside every block: band
  ``label`` of each block's flattened coordinates, c = ceil(n / (M prod G)). The window has
  shape (G_0 c, G_1, ..., G_{k-1}) and the leaf's `PartitionSpec`, so every device keeps the
  window of its own shard: per-device state 1/M of the sharded inner optimizer's, no data
  moved. It is still a partition into M bands walked without replacement, but not the
  unsharded one (the masks of `omgd_mask` are cut over the whole leaf). The grid is recorded
  in the state (``omgd_shard_grid``, zero bytes) so `update` under `jit` with `Auto` axes, where
  shardings are not visible, cuts the same bands; a grid of ones is the unsharded layout.
* layer granularity: stacked leaves contribute their gamma active layers, shape
  (gamma, *rest); unrolled layers put slot s at the leaves of layer s (all layers must share one
  structure). The always-active leaves form a second, *dense* view.
* extra units (``units=``, layer granularity): each of the E extra units keeps its inner state in
  one shared slot, flat buffers as long as the largest unit's state leaves (`unit_slot`): a
  unit's state restarts, as the layer view's does, whenever its phase begins, so only the active
  unit's is live. Only the phase's unit sees a gradient and gets an update, so a unit's moments
  start from zero each time it comes back, exactly as a layer's. With an elementwise inner
  optimizer (``elementwise=True``: `omgd_jax.omgd_adamw` without a decay mask) the layer
  view's state lives in the slot too, leaf after leaf, when its arrays fit in the buffers
  the units need (`omgd_compact`'s ``slot_layouts``). ``frozen=`` leaves are in no view: no
  inner state, and an update of zeros.

Reading gathers a view from a full tree; writing scatters a view back into a full-size tree of
zeros (an update, so inactive coordinates do not move).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from omgd_jax._src import layers as layers_lib
from omgd_jax._src import ordering, unit_slot
from omgd_jax._src.placeholder import NotParams, is_params_placeholder
from omgd_jax._src.schedule import MaskSchedule, check_key
from omgd_jax._src.transforms import check_units_record, init_mask_state, next_unit

MASKED = optax.MaskedNode()


class LayerIds(NamedTuple):
    """What the lean step hands ``update`` of a layer-wise compact state, as ``layer_ids=``.

    With it, every stacked leaf of the gradient and of the parameters is already the
    ``[gamma, ...]`` view of layers ``ids`` (no ``[N_L, ...]`` array to read or write), and the
    updates of the stacked leaves come back as views too. `omgd_jax.active_layers` reads
    ``ids`` from the state; ``lean_train_step`` builds this for you.
    """

    ids: jax.Array  # int32[gamma]: the layers this update trains (the state's omgd_layer_ids).
    num_layers: int  # the depth N_L of the stack (static).


class OmgdCompactState(NamedTuple):
    """State of ``omgd(..., state="compact")``: inner state over the active share only."""

    omgd_key: jax.Array  # typed PRNG key of the masks, as in `OmgdMaskState`.
    omgd_step: jax.Array  # int32, optimizer steps taken.
    omgd_phase: jax.Array  # int32 id of the mask the buffers were started for; -1: none yet.
    omgd_active_state: Any  # inner state over the fixed-size view of the active share.
    omgd_dense_state: Any  # layer granularity: inner state of the always-active leaves.
    omgd_layer_ids: jax.Array  # layer granularity: int32[gamma], the layers the next update
    # trains (`omgd_jax.active_layers` reads it to build a lean step); EmptyState otherwise.
    omgd_shard_grid: Any  # element granularity: per leaf, uint8 zeros of shape ``(*grid, 1)``:
    # the shards along every axis its bands are cut inside (one byte a shard); else ().
    omgd_unit_state: Any = optax.EmptyState()  # with units=: the extra units' inner state, one
    # shared slot {"<dtype>:<position>": flat buffer} as long as the largest unit's leaf there
    # (`unit_slot`; only the active unit's state is live, restarted at every phase change);
    # EmptyState() without.
    omgd_unit: Any = optax.EmptyState()  # with units=: int32, the extra unit the next update
    # trains, -1 in a layers phase (a lean step reads it beside omgd_layer_ids); else EmptyState().


def window_shape(
    shape: tuple[int, ...], num_masks: int, grid: tuple[int, ...] | None = None
) -> tuple[int, ...]:
    """Shape of a leaf's element window: ceil(n / M) coordinates, the leaf's rank kept.

    With a shard grid G (see the module docstring): (G_0 c, G_1, ..., G_{k-1}) with
    c = ceil(n / (M prod G)), every block's band along the axes it is sharded on.
    """
    if not shape:
        return ()
    grid = grid or (1,) * len(shape)
    c = -(-(math.prod(shape) // math.prod(grid)) // num_masks)
    return (grid[0] * c,) + tuple(grid[1:])


def _to_blocks(leaf: jax.Array, grid: tuple[int, ...]) -> jax.Array:
    """(G_0, ..., G_{k-1}, n_b): the coordinates of every block of the grid, flattened."""
    k = leaf.ndim
    split = []
    for d, g in zip(leaf.shape, grid, strict=True):
        split += [g, d // g]
    x = leaf.reshape(split).transpose([2 * i for i in range(k)] + [2 * i + 1 for i in range(k)])
    return x.reshape(tuple(grid) + (-1,))


def _from_blocks(blocks: jax.Array, shape: tuple[int, ...], grid: tuple[int, ...]) -> jax.Array:
    """Inverse of `_to_blocks`."""
    k = len(shape)
    local = tuple(d // g for d, g in zip(shape, grid, strict=True))
    x = blocks.reshape(tuple(grid) + local)
    order = [j for i in range(k) for j in (i, k + i)]
    return x.transpose(order).reshape(shape)


def read_window(
    leaf: jax.Array, label: jax.Array, num_masks: int, grid: tuple[int, ...] | None = None
) -> jax.Array:
    """Band ``label`` of ``leaf.ravel()``: row ``label`` of its (M, c) view, zero-padded.

    The padding (M c - n entries of the last band) reads as zero gradient and zero parameter,
    so the inner optimizer's update there is zero, and `write_window` drops it anyway. With a
    shard grid the band is cut inside every block (see the module docstring).
    """
    if grid is not None and any(g > 1 for g in grid):
        return _explicit_to_auto(
            lambda x, t: _read_blocks(x, t, num_masks, grid), leaf, jnp.asarray(label)
        )
    shape = window_shape(leaf.shape, num_masks)
    c, n = math.prod(shape), leaf.size
    flat = leaf.reshape(-1)
    if num_masks * c != n:
        flat = jnp.pad(flat, (0, num_masks * c - n))
    return jax.lax.dynamic_index_in_dim(flat.reshape(num_masks, c), label, 0, False).reshape(shape)


def _read_blocks(leaf, label, num_masks, grid):
    k = leaf.ndim
    blocks = _to_blocks(leaf, grid)
    n_b = blocks.shape[-1]
    c = -(-n_b // num_masks)
    if num_masks * c != n_b:
        blocks = jnp.pad(blocks, [(0, 0)] * k + [(0, num_masks * c - n_b)])
    rows = blocks.reshape(tuple(grid) + (num_masks, c))
    window = jax.lax.dynamic_index_in_dim(rows, label, k, False)  # (*G, c)
    window = jnp.moveaxis(window, k, 1)  # (G_0, c, G_1, ...)
    return window.reshape(window_shape(leaf.shape, num_masks, grid))


def write_window(
    window: jax.Array,
    leaf_shape,
    label: jax.Array,
    num_masks: int,
    grid: tuple[int, ...] | None = None,
) -> jax.Array:
    """A full-size update holding ``window`` in band ``label`` and zeros elsewhere.

    Written as a broadcast-select on the (M, c) view, not a `dynamic_update_slice` into zeros:
    XLA:CPU fuses the latter into its consumers and evaluates it element by element, an order
    of magnitude slower (`benchmarks/update_cost.py` measures the update).
    """
    if grid is not None and any(g > 1 for g in grid):
        return _explicit_to_auto(
            lambda w, t: _write_blocks(w, tuple(leaf_shape), t, num_masks, grid),
            window,
            jnp.asarray(label),
        )
    n, c = math.prod(leaf_shape), window.size
    rows = jnp.arange(num_masks).reshape(num_masks, 1) == label
    flat = jnp.where(rows, window.reshape(1, c), jnp.zeros((), window.dtype)).reshape(-1)
    return flat[:n].reshape(leaf_shape)


def _write_blocks(window, leaf_shape, label, num_masks, grid):
    k = len(leaf_shape)
    c = window.shape[0] // grid[0]
    w = jnp.moveaxis(window.reshape((grid[0], c) + tuple(grid[1:])), 1, k)  # (*G, c)
    rows = (jnp.arange(num_masks) == label).reshape((1,) * k + (num_masks, 1))
    full = jnp.where(rows, jnp.expand_dims(w, k), jnp.zeros((), window.dtype))
    n_b = math.prod(leaf_shape) // math.prod(grid)
    full = full.reshape(tuple(grid) + (num_masks * c,))[..., :n_b]
    return _from_blocks(full, leaf_shape, grid)


def _explicit_to_auto(fn, x, label):
    """``fn(x, label)``; under `Explicit` mesh axes run with them `Auto` (the reshapes of the
    block views need no sharding annotations), the result given ``x``'s `PartitionSpec`."""
    spec = _explicit_spec(x)
    if spec is None:
        return fn(x, label)
    return jax.sharding.auto_axes(fn, out_sharding=spec)(x, label)


def _explicit_spec(x):
    """The `PartitionSpec` of ``x`` when it is typed with `Explicit` mesh axes, else None."""
    try:
        sharding = jax.typeof(x).sharding
    except Exception:  # noqa: BLE001 - not a jax value
        return None
    mesh = getattr(sharding, "mesh", None)
    spec = getattr(sharding, "spec", None)
    explicit = getattr(jax.sharding.AxisType, "Explicit", None)
    if mesh is None or spec is None or not getattr(mesh, "axis_types", ()):
        return None
    if not any(t == explicit for t in mesh.axis_types) or all(a is None for a in spec):
        return None
    return spec


def leaf_sharding(leaf):
    """The `NamedSharding` of ``leaf`` when one is known (concrete array, ShapeDtypeStruct with a
    sharding, tracer typed with Explicit axes), else None."""
    if not isinstance(leaf, jax.core.Tracer):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return sharding
        return None
    try:
        sharding = jax.typeof(leaf).sharding
    except Exception:  # noqa: BLE001
        return None
    if _explicit_spec(leaf) is None:
        return None
    return sharding


def shard_grid(leaf) -> tuple[int, ...]:
    """Number of shards along every axis of ``leaf`` (ones when its sharding is not known)."""
    shape = tuple(leaf.shape)
    sharding = leaf_sharding(leaf)
    if sharding is None:
        return (1,) * len(shape)
    sizes = dict(zip(sharding.mesh.axis_names, sharding.mesh.axis_sizes, strict=True))
    grid = []
    for i, d in enumerate(shape):
        entry = sharding.spec[i] if i < len(sharding.spec) else None
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        g = math.prod(sizes.get(a, 1) for a in names if isinstance(a, str))
        grid.append(g if g > 0 and d % g == 0 else 1)
    return tuple(grid)


def unrolled_positions(plan: layers_lib.Plan, leaves) -> list[list[int]]:
    """Leaf indices of every unrolled layer, checked to share one structure."""
    positions = [[] for _ in range(plan.num_layers)]
    for i, lid in enumerate(plan.layer_of):
        if plan.roles[i] == layers_lib.UNROLLED:
            positions[lid].append(i)
    signature = [(leaves[i].shape, leaves[i].dtype) for i in positions[0]]
    for lid, pos in enumerate(positions):
        if [(leaves[i].shape, leaves[i].dtype) for i in pos] != signature:
            raise ValueError(
                f"state='compact' with unrolled layers needs every layer to have the same leaves "
                f"(shapes and dtypes); layer {lid} differs from layer 0. Stack the layers "
                "(nnx.scan / nnx.vmap) or use state='frozen'"
            )
    return positions


def read_layers(plan: layers_lib.Plan, leaves, ids: jax.Array) -> list:
    """The view of the active layers ``ids`` (int32[gamma]); MaskedNode elsewhere."""
    out = [MASKED] * len(leaves)
    gamma = ids.shape[0]
    for i, role in enumerate(plan.roles):
        if role == layers_lib.STACKED:
            out[i] = jnp.stack(
                [jax.lax.dynamic_index_in_dim(leaves[i], ids[s], 0, False) for s in range(gamma)]
            )
    if layers_lib.UNROLLED in plan.roles:
        positions = unrolled_positions(plan, leaves)
        for s in range(gamma):
            branches = [lambda pos=pos: tuple(leaves[i] for i in pos) for pos in positions]
            for i, value in zip(positions[s], jax.lax.switch(ids[s], branches), strict=True):
                out[i] = value
    return out


def write_layers(plan: layers_lib.Plan, view: list, leaves, ids: jax.Array) -> list:
    """Scatters a layer view back: full-size zeros with the active layers filled in."""
    out = [None] * len(leaves)
    gamma = ids.shape[0]
    for i, role in enumerate(plan.roles):
        if role == layers_lib.STACKED:
            # A broadcast-select per active layer (see `write_window` for why not a DUS).
            layer = jnp.arange(leaves[i].shape[0]).reshape((-1,) + (1,) * (leaves[i].ndim - 1))
            full = jnp.zeros((), view[i].dtype)
            for s in range(gamma):
                full = jnp.where(layer == ids[s], view[i][s][None], full)
            out[i] = full
    if layers_lib.UNROLLED in plan.roles:
        positions = unrolled_positions(plan, leaves)
        slots = [tuple(view[i] for i in positions[s]) for s in range(gamma)]
        zeros = tuple(jnp.zeros_like(v) for v in slots[0])
        branches = [lambda: zeros] + [lambda v=v: v for v in slots]
        for lid, pos in enumerate(positions):
            slot = jnp.sum(jnp.where(ids == lid, jnp.arange(1, gamma + 1), 0))  # 0: inactive
            for i, value in zip(pos, jax.lax.switch(slot, branches), strict=True):
                out[i] = value
    return out


# --------------------------------------------------------------------------- the transformation
def check_compact(schedule: MaskSchedule) -> None:
    """Raises unless the compact state can hold ``schedule``'s active share at a fixed size."""
    if schedule.granularity == "tensor":
        raise ValueError(
            "state='compact' supports granularity 'element' and 'layer' (tensor groups have "
            "no fixed size); use state='frozen' with granularity='tensor'"
        )
    if schedule.granularity == "element" and schedule.layout not in ("contiguous", "strided"):
        raise ValueError(
            "state='compact' needs layout='contiguous' or 'strided' for element granularity "
            f"(fixed-size bands), got layout={schedule.layout!r}"
        )
    if schedule.warmup_steps:
        raise ValueError(
            "warmup_steps must be 0 with state='compact' (the state cannot change size "
            "under jit): warm up with the inner optimizer alone and then switch, or use "
            "state='frozen'"
        )


def _zeros(tree):
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)


def view_sharding(leaf, role: str, view_shape=None):
    """Where the view of ``leaf`` lives: an element window keeps the leaf's `PartitionSpec`
    (its shape is (G_0 c, G_1, ...); a strided window (ceil(R / M), ...) keeps every axis
    whose size the shards still divide); a stacked leaf's [gamma, ...] view keeps every axis
    but the layer axis. None when the leaf's sharding is not known."""
    sharding = leaf_sharding(leaf)
    if sharding is None or role not in (layers_lib.UNIT, layers_lib.STACKED, layers_lib.UNROLLED):
        return None
    spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
    if role == layers_lib.UNIT and view_shape is not None:
        sizes = dict(zip(sharding.mesh.axis_names, sharding.mesh.axis_sizes, strict=True))

        def shards(entry):
            names = () if entry is None else (entry,) if isinstance(entry, str) else entry
            return math.prod(sizes.get(a, 1) for a in names)

        spec = tuple(
            a if d % shards(a) == 0 else None for a, d in zip(spec, view_shape, strict=True)
        )
    elif role == layers_lib.UNIT:
        grid = shard_grid(leaf)
        spec = tuple(a if g > 1 else None for a, g in zip(spec, grid, strict=True))
    elif role == layers_lib.STACKED:
        spec = (None,) + spec[1:]
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def sharded_zeros(struct, sharding):
    """Zeros of ``struct``'s shape and dtype, placed with ``sharding`` when one is given."""
    if sharding is None:
        return jnp.zeros(struct.shape, struct.dtype)
    if isinstance(sharding.mesh, jax.sharding.Mesh):  # concrete devices
        return jnp.zeros(struct.shape, struct.dtype, device=sharding)
    return jnp.zeros(struct.shape, struct.dtype, out_sharding=sharding.spec)


def grid_record(grids) -> tuple:
    """The shard grids as stored in the state: uint8 zeros of shape (*grid, 1).

    A grid is static (it fixes the window's shape), so it is kept as a shape; one byte per
    shard rather than none because Orbax cannot checkpoint zero-size arrays.
    """
    return tuple(jnp.zeros(tuple(g) + (1,), jnp.uint8) for g in grids)


def grids_of(record, num_leaves: int) -> list:
    """The shard grids stored by `grid_record` (unsharded when the record is empty)."""
    if not record:
        return [None] * num_leaves
    if len(record) != num_leaves:
        raise ValueError("omgd: the update tree does not match the tree given to init")
    return [tuple(r.shape[:-1]) for r in record]


def _is_leaf_wrapper(x) -> bool:
    """A pytree node around exactly one leaf that is not a container (e.g. `nnx.Param`).

    Views put `optax.MaskedNode` in place of the whole wrapper: a wrapper holding a MaskedNode
    has no shape, which `nnx.eval_shape(lambda: nnx.Optimizer(...))` cannot give a sharding.
    """
    if isinstance(x, (dict, list, tuple)) or x is None or isinstance(x, optax.MaskedNode):
        return False
    if hasattr(x, "keys") and hasattr(x, "items"):  # mappings such as nnx.State
        return False
    children = jax.tree_util.tree_flatten(x)[0]
    return len(children) == 1 and children[0] is not x


class ViewTrees:
    """Builds view trees from per-leaf lists and reads them back, wrappers kept around the
    leaves that take part and replaced by a bare MaskedNode around the others."""

    def __init__(self, tree):
        self.treedef = jax.tree.structure(tree)
        units, self.outer = jax.tree.flatten(tree, is_leaf=_is_leaf_wrapper)
        self.wrappers = [jax.tree.structure(u) if _is_leaf_wrapper(u) else None for u in units]

    def unflatten(self, xs):
        if xs is None:
            return None
        if all(w is None for w in self.wrappers):
            return jax.tree.unflatten(self.treedef, xs)
        units = [
            x if (w is None or x is MASKED) else w.unflatten([x])
            for x, w in zip(xs, self.wrappers, strict=True)
        ]
        return jax.tree.unflatten(self.outer, units)

    def flatten(self, tree) -> list:
        if all(w is None for w in self.wrappers):
            return self.treedef.flatten_up_to(tree)
        units = self.outer.flatten_up_to(tree)
        return [
            u if (w is None or isinstance(u, optax.MaskedNode)) else jax.tree.leaves(u)[0]
            for u, w in zip(units, self.wrappers, strict=True)
        ]


def strided_window_shape(shape: tuple[int, ...], num_masks: int) -> tuple[int, ...]:
    """Shape of a leaf's strided window: ceil(R / M) of its R rows, the other axes whole."""
    if not shape:
        return ()
    return (-(-shape[0] // num_masks),) + tuple(shape[1:])


def read_strided(leaf: jax.Array, label: jax.Array, num_masks: int) -> jax.Array:
    """Rows ``label, label + M, ...`` of ``leaf`` (zero rows past the end), as one window.

    The (c, M, ...) view of the rows splits the row axis with M minor, so a leaf sharded along
    its rows into blocks of a multiple of M rows keeps every window row on its own shard, and
    the window has the leaf's `PartitionSpec`: nothing moves between devices.
    """
    if not leaf.shape:
        return leaf
    return _explicit_to_auto(lambda x, t: _read_strided(x, t, num_masks), leaf, jnp.asarray(label))


def _read_strided(leaf, label, num_masks):
    rows, rest = leaf.shape[0], leaf.shape[1:]
    c = -(-rows // num_masks)
    if c * num_masks != rows:
        leaf = jnp.pad(leaf, [(0, c * num_masks - rows)] + [(0, 0)] * len(rest))
    return jax.lax.dynamic_index_in_dim(leaf.reshape((c, num_masks) + rest), label, 1, False)


def write_strided(window: jax.Array, leaf_shape, label: jax.Array, num_masks: int) -> jax.Array:
    """A full-size update holding ``window`` in the rows of band ``label``, zeros elsewhere (a
    broadcast-select on the (c, M, ...) view, as `write_window`)."""
    if not leaf_shape:
        return jnp.where(label == 0, window, jnp.zeros((), window.dtype))

    def write(w, t):
        c, rest = w.shape[0], w.shape[1:]
        on = (jnp.arange(num_masks) == t).reshape((1, num_masks) + (1,) * len(rest))
        full = jnp.where(on, jnp.expand_dims(w, 1), jnp.zeros((), w.dtype))
        return full.reshape((c * num_masks,) + rest)[: leaf_shape[0]]

    return _explicit_to_auto(write, window, jnp.asarray(label))


def read_view(
    schedule: MaskSchedule, plan: layers_lib.Plan, num_masks: int, leaves, where, grids=None
):
    """The view of the active share: element windows (``where``: the label) or the gamma active
    layers (``where``: their ids); MaskedNode for leaves outside it. ``grids``: the shard grid
    of every leaf (element granularity; None: unsharded)."""
    if schedule.granularity == "layer":
        return read_layers(plan, leaves, where)
    view = [MASKED] * len(leaves)
    for i in plan.unit_leaves:
        if schedule.layout == "strided":
            view[i] = read_strided(leaves[i], where, num_masks)
        else:
            view[i] = read_window(leaves[i], where, num_masks, None if grids is None else grids[i])
    return view


def write_view(
    schedule: MaskSchedule, plan: layers_lib.Plan, num_masks: int, view, leaves, where, grids=None
):
    """Full-size updates: the view in place, zeros elsewhere (None outside the view)."""
    if schedule.granularity == "layer":
        return write_layers(plan, view, leaves, where)
    out = [None] * len(leaves)
    for i in plan.unit_leaves:
        if schedule.layout == "strided":
            out[i] = write_strided(view[i], leaves[i].shape, where, num_masks)
            continue
        grid = None if grids is None else grids[i]
        out[i] = write_window(view[i], leaves[i].shape, where, num_masks, grid)
    return out


def view_shapes(
    plan: layers_lib.Plan, num_masks: int, leaves, grids=None, strided: bool = False
) -> tuple[list, list]:
    """Shapes of the view and of the dense part (always-active leaves), for init.

    Works on `jax.ShapeDtypeStruct` leaves; MaskedNode where a leaf takes no part.
    """

    def struct(shape, x):
        return jax.ShapeDtypeStruct(shape, x.dtype)

    view = [MASKED] * len(leaves)
    dense = [MASKED] * len(leaves)
    gamma = plan.num_layers // max(num_masks - plan.num_extra, 1)  # layers of a layers phase
    for i, (x, role) in enumerate(zip(leaves, plan.roles, strict=True)):
        if role == layers_lib.UNIT and strided:
            view[i] = struct(strided_window_shape(x.shape, num_masks), x)
        elif role == layers_lib.UNIT:
            grid = None if grids is None else grids[i]
            view[i] = struct(window_shape(x.shape, num_masks, grid), x)
        elif role == layers_lib.STACKED:
            view[i] = struct((gamma,) + x.shape[1:], x)
        elif role == layers_lib.ALWAYS:
            dense[i] = x
    if layers_lib.UNROLLED in plan.roles:
        positions = unrolled_positions(plan, leaves)
        for s in range(gamma):
            for i in positions[s]:
                view[i] = struct(leaves[i].shape, leaves[i])
    return view, dense


def _leaf_zeros(v):
    """A view entry as an array: arrays as they are, shapes as (sharded) zeros."""
    if v is MASKED or isinstance(v, jax.Array):
        return v
    return sharded_zeros(v, leaf_sharding(v))


def _same_shapes(a, b) -> bool:
    return jax.tree.map(jnp.shape, a) == jax.tree.map(jnp.shape, b)


def omgd_compact(
    inner: optax.GradientTransformation,
    schedule: MaskSchedule,
    key: jax.Array | int,
    *,
    elementwise: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """``omgd(inner, ..., state="compact")`` for a built schedule; see :func:`omgd_jax.omgd`.

    Args:
      inner: the optimizer to run on the view of the active share (and, for layer
        granularity, on the always-active leaves, with a state of its own, and on the extra
        units' leaves, with a third one).
      schedule: the masks; checked with `check_compact`.
      key: PRNG key or int seed of the masks.
      elementwise: whether ``inner`` treats every coordinate on its own (Adam, SGD: no
        norms, no per-leaf decisions such as a decay mask on the whole tree), so its state on
        a tree is its states on the leaves, one by one. With extra units, the layer view's
        state may then share their slot (updated leaf by leaf; `slot_layouts`).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state `OmgdCompactState`; extra args
      other than ``mask_index`` are forwarded to ``inner``.
    """
    check_compact(schedule)
    check_key(key)
    inner = optax.with_extra_args_support(inner)
    layer = schedule.granularity == "layer"
    strided = schedule.layout == "strided" and not layer

    def init_fn(params):
        mask_fields = init_mask_state(key)
        if is_params_placeholder(params):
            units = (NotParams(),) * 2 if schedule.units is not None else ()
            return OmgdCompactState(*mask_fields, jnp.int32(-1), *(NotParams(),) * 4, *units)
        leaves = jax.tree.leaves(params)
        trees = ViewTrees(params)
        plan = schedule.plan(params)
        grids = None
        if not layer:  # strided bands need no grid: they are the same on every mesh
            grids = [
                shard_grid(x) if r == layers_lib.UNIT and not strided else (1,) * len(x.shape)
                for x, r in zip(leaves, plan.roles, strict=True)
            ]
        view, dense = view_shapes(plan, schedule.masks_for(plan), leaves, grids, strided)
        zeros = [
            v
            if v is MASKED
            else sharded_zeros(v, view_sharding(x, r, v.shape if strided else None))
            for v, x, r in zip(view, leaves, plan.roles, strict=True)
        ]
        shared = bool(slot_layouts(plan, leaves, trees, view)[1])
        active = optax.EmptyState() if shared else inner.init(trees.unflatten(zeros))
        dense_state = unit_state = optax.EmptyState()
        if layer:
            dense_state = inner.init(trees.unflatten([_leaf_zeros(v) for v in dense]))
        if plan.num_extra:
            unit_state = unit_slot.empty_slot(unit_layout(plan, leaves, trees, view))
        mask_key, step = mask_fields.omgd_key, mask_fields.omgd_step
        ids = next_layer_ids(plan, mask_key, step)
        record = () if layer else grid_record(grids)
        return OmgdCompactState(
            *mask_fields,
            jnp.int32(-1),
            active,
            dense_state,
            ids,
            record,
            unit_state,
            next_unit(schedule, plan, mask_key, step),
        )

    def next_layer_ids(plan, key, step):
        """The layers the update at ``step`` trains: int32[gamma] (layer granularity)."""
        if not layer:
            return optax.EmptyState()
        return schedule.active(plan, key, step).layer_ids.astype(jnp.int32)

    def update_fn(
        updates,
        state,
        params=None,
        *,
        mask_index=None,
        layer_ids: LayerIds | None = None,
        **extra_args,
    ):
        leaves, treedef = jax.tree.flatten(updates)
        p_leaves = None if params is None else treedef.flatten_up_to(params)
        trees = ViewTrees(updates)
        plan = schedule.plan(updates)
        grids = None if layer else grids_of(state.omgd_shard_grid, len(leaves))
        # The lean step (`omgd_jax.lean_train_step`) hands every stacked leaf, gradient and
        # parameter alike, as the [gamma, ...] view of layers `layer_ids.ids`: no [N_L, ...]
        # array to read from or write to.
        lean = layer_ids is not None
        if lean:
            if not isinstance(layer_ids, LayerIds):
                raise TypeError(
                    "omgd: layer_ids= must be an omgd_jax.LayerIds(ids, num_layers), got "
                    f"{type(layer_ids).__name__}"
                )
            if not layer or mask_index is not None:
                raise ValueError(
                    "omgd: layer_ids= (the lean layer-wise step) needs granularity='layer' "
                    "and no mask_index"
                )
            depth = layer_ids.num_layers
            plan = dataclasses.replace(plan, num_layers=depth, num_units=depth)
        check_units_record(plan, state.omgd_unit, schedule.units)
        active = schedule.active(plan, state.omgd_key, state.omgd_step, mask_index)
        num_masks = active.num_masks
        where = active.layer_ids if layer else active.label
        unflat = trees.unflatten

        shapes, dense_shapes = view_shapes(plan, num_masks, leaves, grids, strided)
        shared = bool(slot_layouts(plan, p_leaves or leaves, trees, shapes)[1])
        expected = (
            optax.EmptyState() if shared else jax.eval_shape(inner.init, unflat(shapes))
        )  # trace-time check only
        if not _same_shapes(expected, state.omgd_active_state):
            raise ValueError("omgd: the update tree does not match the tree given to init")
        if plan.num_extra or layers_lib.FROZEN in plan.roles:  # frozen=/units= move leaves
            same = _same_shapes(jax.eval_shape(inner.init, unflat(dense_shapes)),
                                state.omgd_dense_state)  # fmt: skip
            if plan.num_extra:  # frozen= alone: no unit state (EmptyState)
                layout = unit_layout(plan, p_leaves or leaves, trees, shapes)
                same = same and unit_slot.slot_matches(layout, state.omgd_unit_state)
            if not same:
                raise ValueError(
                    "omgd: the update tree does not match the tree given to init (the "
                    "leaves of units= and frozen= differ from those the state was "
                    "initialised with)"
                )

        def take(xs):
            if lean:  # the stacked leaves are the views already
                return [
                    x if r == layers_lib.STACKED else MASKED
                    for x, r in zip(xs, plan.roles, strict=True)
                ]
            return read_view(schedule, plan, num_masks, xs, where, grids)

        g_view = [v if v is MASKED else v * active.factor for v in take(leaves)]
        layers_on = None
        if plan.num_extra:  # a unit phase trains no layer: zero gradient, update dropped
            layers_on = active.unit < 0
            g_view = [
                v if isinstance(v, optax.MaskedNode) else jnp.where(layers_on, v, 0) for v in g_view
            ]
        p_view = None if p_leaves is None else take(p_leaves)
        reset = active.phase.phase_id != state.omgd_phase  # the mask changed: restart the state
        slot = state.omgd_unit_state
        if shared:
            slot, u_view = layers_in_slot(
                plan,
                slot,
                g_view,
                p_view,
                layers_on,
                reset,
                shapes,
                p_leaves or leaves,
                trees,
                **extra_args,
            )
            new_active = state.omgd_active_state
        else:
            fresh = inner.init(unflat(p_view) if p_view is not None else _zeros(unflat(g_view)))
            old = jax.tree.map(lambda f, o: jnp.where(reset, f, o), fresh, state.omgd_active_state)
            u_view, new_active = inner.update(unflat(g_view), old, unflat(p_view), **extra_args)
            u_view = trees.flatten(u_view)
        if layers_on is not None:
            u_view = [
                u if isinstance(u, optax.MaskedNode) else jnp.where(layers_on, u, 0) for u in u_view
            ]
        if not lean:  # the lean step writes the views with dynamic-update-slices instead
            u_view = ordering.materialise(u_view, reset)
        if lean:
            out = [
                u if r == layers_lib.STACKED else None
                for u, r in zip(u_view, plan.roles, strict=True)
            ]
        else:
            out = write_view(schedule, plan, num_masks, u_view, leaves, where, grids)

        new_dense = state.omgd_dense_state
        if layer:
            dense = lambda xs: [
                x if r == layers_lib.ALWAYS else MASKED for x, r in zip(xs, plan.roles, strict=True)
            ]
            u_dense, new_dense = inner.update(
                unflat(dense(leaves)),
                state.omgd_dense_state,
                None if p_leaves is None else unflat(dense(p_leaves)),
                **extra_args,
            )
            u_dense = trees.flatten(u_dense)
            out = [
                u_dense[i] if r == layers_lib.ALWAYS else x
                for i, (x, r) in enumerate(zip(out, plan.roles, strict=True))
            ]
        new_units = state.omgd_unit_state
        if plan.num_extra:
            u_units, new_units = unit_update(
                plan, leaves, p_leaves, slot, active, reset, trees, shapes, **extra_args
            )
            out = [
                u if r == layers_lib.EXTRA else x
                for x, u, r in zip(out, u_units, plan.roles, strict=True)
            ]
        out = [
            g if r == layers_lib.SKIP else jnp.zeros_like(g) if r == layers_lib.FROZEN else x
            for x, g, r in zip(out, leaves, plan.roles, strict=True)
        ]
        step = optax.safe_increment(state.omgd_step)
        new_state = OmgdCompactState(
            omgd_key=state.omgd_key,
            omgd_step=step,
            omgd_phase=active.phase.phase_id,
            omgd_active_state=new_active,
            omgd_dense_state=new_dense,
            omgd_layer_ids=next_layer_ids(plan, state.omgd_key, step),
            omgd_shard_grid=state.omgd_shard_grid,
            omgd_unit_state=new_units,
            omgd_unit=next_unit(schedule, plan, state.omgd_key, step),
        )
        return jax.tree.unflatten(treedef, out), new_state

    def unit_layout(plan, leaves, trees, view) -> unit_slot.SlotLayout:
        """Where each extra unit's inner state lives in the shared slot: the states of
        ``inner.init`` on the unit's leaves (``leaves``: the parameters, as at init), and the
        layer view's too where `slot_layouts` shares the slot with it."""
        return slot_layouts(plan, leaves, trees, view)[0]

    def slot_layouts(plan, leaves, trees, view):
        """(the slot's layout, the indices of the view's leaves whose states live in it).

        With an elementwise inner optimizer (``elementwise=True``) the layer view's state
        lives in the slot too, after the units' (it is dead in their phases, as theirs is in
        the layers'), when its arrays fit in the buffers the units need anyway (its scalars,
        the counts, may add a few elements): then the state costs the largest unit's, not
        that plus the view's. A view that would lengthen the
        buffers keeps a state of its own (``omgd_active_state``): its leaf-by-leaf update
        in the slot costs temporaries that the saving would not pay for."""
        unit_trees = [
            trees.unflatten(
                [
                    jax.ShapeDtypeStruct(x.shape, x.dtype) if u == e else MASKED
                    for x, u in zip(leaves, plan.unit_of, strict=True)
                ]
            )
            for e in range(plan.num_extra)
        ]
        units_only = unit_slot.slot_layout(inner.init, unit_trees)
        if not (layer and elementwise and plan.num_extra):
            return units_only, []
        in_view = [i for i, v in enumerate(view) if v is not MASKED]
        shared = unit_slot.slot_layout(inner.init, unit_trees, stacked=[view[i] for i in in_view])
        before, first = dict(units_only.sizes), plan.num_extra
        arrays = {e.buffer for entries in shared.entries[first:] for e in entries if e.shape}
        if any(dict(shared.sizes)[b] > before.get(b, 0) for b in arrays):  # scalars may add
            return units_only, []
        return shared, in_view

    def layers_in_slot(plan, slot, g_view, p_view, layers_on, reset, view, p_all, trees,
                       **extra_args):  # fmt: skip
        """The layer view's step with its inner state in the units' slot, leaf by leaf (an
        elementwise inner optimizer): each leaf's state is read out of the slot, updated and
        written back in place (`unit_slot.slot_layout`'s ``stacked``). In a unit's phase the
        slot holds that unit's state, which the write keeps as it was."""
        layout, in_view = slot_layouts(plan, p_all, trees, view)
        first = plan.num_extra
        u = list(g_view)
        for k, i in enumerate(in_view):
            p = None if p_view is None else p_view[i]
            # A leaf's state at offsets of the buffers: its read and its update materialised
            # before the write, so the write is in place (otherwise XLA recomputes them from
            # the slot after it was written, and copies the slot: `ordering.materialise`).
            entries = layout.entries[first + k]
            flags = unit_slot.at_offsets(layout, first + k)
            at_offsets = any(f and e.shape for f, e in zip(flags, entries, strict=True))
            stored = read_for_update(layout, slot, first + k, reset)
            fresh = inner.init(p if p is not None else jnp.zeros_like(g_view[i]))
            old = jax.tree.map(lambda f, o: jnp.where(reset, f, o), fresh, stored)
            u[i], new = inner.update(g_view[i], old, p, **extra_args)
            if at_offsets:
                u[i] = ordering.materialise(u[i], reset)
            new = jax.tree.map(lambda n, o: jnp.where(layers_on, n, o), new, stored)
            slot = unit_slot.write_unit(layout, slot, first + k, new)
        return slot, u

    def unit_update(plan, leaves, p_leaves, slot, active, reset, trees, view, **extra_args):
        """The extra units' step: only the phase's unit sees its (scaled) gradient and gets an
        update. Its inner state lives in the shared slot (`unit_slot`) and restarts whenever
        the phase changes, as the layer view's does; a layers phase leaves the slot as it is.

        One two-way ``lax.cond`` per unit (its phase or not), so the inactive units get no
        inner optimizer work. The unit's gradient enters packed in a buffer as long as the
        largest unit's (`unit_slot` again) and its update leaves in the same buffer when it has
        the gradient's shapes and dtypes: a cond's operands and outputs are buffers of their
        own, and one full-size gradient and update per unit would cost as much as the state
        saved. The slot passes through every cond but its unit's, which XLA updates in place."""
        unflat = trees.unflatten
        layout = unit_layout(plan, p_leaves or leaves, trees, view)
        units = range(plan.num_extra)
        mine = [[u == e for u in plan.unit_of] for e in units]

        # The phase's gradient enters the switch packed too (a branch's operands are buffers):
        # one select over the units' flattened gradients, as long as the largest unit's.
        g_layout = unit_slot.leaves_layout(leaves, plan.unit_of)
        g_packed = unit_slot.select_units(
            g_layout,
            active.unit,
            [[x for x, m in zip(leaves, mine[e], strict=True) if m] for e in units],
        )

        def unit_phase(e, slot, g_packed):
            g_e = iter(unit_slot.read_unit(g_layout, g_packed, e))
            g = [next(g_e) * active.factor if m else MASKED for m in mine[e]]
            p = None
            if p_leaves is not None:
                p = [x if m else MASKED for x, m in zip(p_leaves, mine[e], strict=True)]
            fresh = inner.init(unflat(p) if p is not None else _zeros(unflat(g)))
            stored = read_for_update(layout, slot, e, reset)
            old = jax.tree.map(lambda f, o: jnp.where(reset, f, o), fresh, stored)
            u, new = inner.update(unflat(g), old, unflat(p), **extra_args)
            u = [x for x, m in zip(trees.flatten(u), mine[e], strict=True) if m]
            return unit_slot.write_unit(layout, slot, e, new), u

        shapes = [
            jax.eval_shape(lambda s, g, e=e: unit_phase(e, s, g)[1], slot, g_packed) for e in units
        ]
        g_shapes = [[jax.ShapeDtypeStruct(x.shape, x.dtype) for x, m in zip(leaves, mine[e],
                     strict=True) if m] for e in units]  # fmt: skip
        # The update goes out in the gradient's packed buffer when it has the gradient's
        # shapes and dtypes (no zero-filled buffer of its own to carry through the conds).
        packing = g_layout if shapes == g_shapes else unit_slot.slot_layout(lambda t: t, shapes)

        def phase_of(e, slot, packed):
            slot, u = unit_phase(e, slot, packed if packing is g_layout else g_packed)
            return slot, unit_slot.write_unit(packing, packed, e, u)

        def not_phase(slot, packed):
            return slot, packed

        # One two-way cond a unit, each passing the slot and the packed buffer through
        # untouched but in its unit's phase: XLA then updates the slot in place, where a
        # switch over the units (three or more branches) copies it (Llama-3.1-8B: 1.96 GiB).
        unit = jnp.asarray(active.unit, jnp.int32)
        new = slot
        packed = g_packed if packing is g_layout else unit_slot.empty_slot(packing)
        for e in units:
            new, packed = jax.lax.cond(
                unit == e, functools.partial(phase_of, e), not_phase, new, packed
            )
        u = unit_slot.unpack_active(packing, packed, active.unit, plan.unit_of)
        return [u.get(i) for i in range(len(leaves))], new

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def read_for_update(layout, slot, unit: int, pred):
    """Unit ``unit``'s tree read out of the slot, its leaves at offsets of their buffers
    materialised (`unit_slot.at_offsets`), so that writing the unit back is in place."""
    tree = unit_slot.read_unit(layout, slot, unit)
    leaves = layout.treedefs[unit].flatten_up_to(tree)
    flags = unit_slot.at_offsets(layout, unit)
    copied = iter(ordering.materialise([x for x, f in zip(leaves, flags, strict=True) if f], pred))
    leaves = [next(copied) if f else x for x, f in zip(leaves, flags, strict=True)]
    return jax.tree.unflatten(layout.treedefs[unit], leaves)
