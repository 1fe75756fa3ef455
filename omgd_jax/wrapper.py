"""`omgd`: wrap any optax optimizer so that it runs, and keeps state, only where OMGD trains."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from omgd_jax import compact as compact_lib
from omgd_jax import frozen as frozen_lib
from omgd_jax import layers as layers_lib
from omgd_jax.schedule import MaskSchedule, canonical_key, check_choice, check_key

STATES = ("compact", "frozen")

# Arguments of `omgd`, `omgd_mask` and `omgd_adamw` that shape the computation rather than
# being hyperparameters: `optax.inject_hyperparams(f, static_args=omgd_jax.static_args(f))`.
STATIC_ARGS = (
    "num_masks",
    "steps_per_mask",
    "key",
    "granularity",
    "traversal",
    "scale",
    "warmup_steps",
    "layers",
    "layers_per_phase",
    "layout",
    "balance",
    "repartition",
    "state",
    "mask",
)


def static_args(factory) -> tuple[str, ...]:
    """The arguments of ``factory`` that `optax.inject_hyperparams` must leave alone."""
    return tuple(a for a in STATIC_ARGS if a in inspect.signature(factory).parameters)


class OmgdCompactState(NamedTuple):
    """State of ``omgd(..., state="compact")``: inner state over the active share only."""

    omgd_key: jax.Array  # typed PRNG key of the masks, as in `OmgdMaskState`.
    omgd_step: jax.Array  # int32, optimizer steps taken.
    omgd_phase: jax.Array  # int32 id of the mask the buffers were started for; -1: none yet.
    omgd_active_state: Any  # inner state over the fixed-size view of the active share.
    omgd_dense_state: Any  # layer granularity: inner state of the always-active leaves.
    omgd_layer_ids: jax.Array  # layer granularity: int32[gamma], the layers the next update
    # trains (read by `omgd_jax.active_layers` to build a lean step); int32[0] otherwise.


class OmgdFrozenState(NamedTuple):
    """State of ``omgd(..., state="frozen")``: full inner state, one per unit."""

    omgd_key: jax.Array  # typed PRNG key of the masks, as in `OmgdMaskState`.
    omgd_step: jax.Array  # int32, optimizer steps taken.
    omgd_inner_state: Any  # inner state per leaf (per layer for stacked leaves), transposed.


def _is_placeholder(params) -> bool:
    """`optax.tree.map_params` calls init with one opaque placeholder instead of a tree."""
    return type(params).__name__ == "_ParamsPlaceholder"


class _NotParams:
    """Stands in (as a leaf), under `map_params`, for compact state that is not params-shaped."""


def _zeros(tree):
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)


def omgd(
    inner: optax.GradientTransformation,
    num_masks: int | None = None,
    steps_per_mask: int = 1,
    *,
    state: str = "compact",
    key: jax.Array | int = 0,
    granularity: str = "element",
    traversal: str = "wor",
    scale: bool = True,
    warmup_steps: int = 0,
    layers: layers_lib.LayerSpec | None = None,
    layers_per_phase: int | None = None,
    layout: str = "contiguous",
    balance: str = "count",
    repartition: bool = True,
    _inners_for=None,
) -> optax.GradientTransformationExtraArgs:
    r"""Runs ``inner`` only on OMGD's active share of the parameters.

    The masks are exactly those of :func:`omgd_jax.omgd_mask` with the same arguments: the
    inner optimizer receives :math:`S_t \odot g_t` restricted to the active share and its
    update is zero elsewhere. What differs is the inner optimizer's state:

    * ``state="compact"`` (LISA / BAdam): the inner state exists only for the active share,
      in fixed-size buffers (element granularity: a window of ceil(n/M) coordinates per leaf;
      layer granularity: the gamma active layers, plus the always-active leaves), and is
      re-initialised, counters included, whenever the active mask changes. Optimizer memory is
      about 1/M of the inner optimizer's. Supports ``granularity`` "element" (with
      ``layout="contiguous"``) and "layer", and ``warmup_steps=0`` (warm up with ``inner``
      alone, then switch, as ``examples/gpt2`` does).
    * ``state="frozen"`` (the paper's released code): a full inner state per unit (leaf, or
      layer of a stacked leaf) with its own step counter; inactive units keep their parameters
      and state untouched and get no weight decay. Saves no memory. Since ``inner`` runs leaf
      by leaf, transformations inside it that couple leaves (global-norm clipping) see one
      unit at a time: clip before ``omgd``.

    Either way a learning-rate schedule *inside* ``inner`` would follow the inner counter;
    put it after ``omgd`` (``optax.scale_by_learning_rate``), as :func:`omgd_adamw` does.

    Args:
      inner: the optax optimizer to run on the active share.
      num_masks: M, see :func:`omgd_jax.omgd_mask`.
      steps_per_mask: K, see :func:`omgd_jax.omgd_mask`.
      state: ``"compact"`` or ``"frozen"``.
      key: PRNG key or int seed of the masks.
      granularity, traversal, scale, warmup_steps, layers, layers_per_phase, layout, balance,
        repartition: as in :func:`omgd_jax.omgd_mask`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra args (``mask_index`` and anything
      else) are forwarded to ``inner``.

    Examples:
      >>> import jax.numpy as jnp, optax, omgd_jax
      >>> tx = omgd_jax.omgd(optax.adam(1e-3), num_masks=4, steps_per_mask=10)
      >>> state = tx.init({"w": jnp.zeros((64, 64))})
      >>> optax.tree.get(state, "mu")["w"].shape  # a quarter of the coordinates
      (1024, 1)
    """
    schedule = MaskSchedule(
        num_masks,
        steps_per_mask,
        granularity,
        traversal,
        scale,
        warmup_steps,
        layers,
        layers_per_phase,
        layout,
        balance,
        repartition,
    )
    check_choice("state", state, STATES)
    check_key(key)
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(f"inner must be an optax.GradientTransformation, got {inner!r}")
    if state == "compact":
        if granularity == "tensor":
            raise ValueError(
                "state='compact' supports granularity 'element' and 'layer' (tensor groups have "
                "no fixed size); use state='frozen' with granularity='tensor'"
            )
        if granularity == "element" and layout != "contiguous":
            raise ValueError("state='compact' needs layout='contiguous' for element granularity")
        if warmup_steps:
            raise ValueError(
                "warmup_steps must be 0 with state='compact' (the state cannot change size "
                "under jit): warm up with the inner optimizer alone and then switch, or use "
                "state='frozen'"
            )
        return _compact(schedule, optax.with_extra_args_support(inner), key)
    inner = optax.with_extra_args_support(inner)
    if _inners_for is None:
        _inners_for = lambda params: [inner] * len(jax.tree.leaves(params))
    return _frozen(schedule, _inners_for, inner, key)


# ----------------------------------------------------------------------------------- compact
def _compact(schedule: MaskSchedule, inner, key) -> optax.GradientTransformationExtraArgs:
    layer = schedule.granularity == "layer"

    def read(plan, num_masks, leaves, where):
        """The view of the active share: element windows or the gamma active layers."""
        if layer:
            return compact_lib.read_layers(plan, leaves, where)
        view = [compact_lib.MASKED] * len(leaves)
        for i in plan.unit_leaves:
            view[i] = compact_lib.read_window(leaves[i], where, num_masks)
        return view

    def write(plan, num_masks, view, leaves, where):
        """Full-size updates: the view in place, zeros elsewhere (None outside the view)."""
        if layer:
            return compact_lib.write_layers(plan, view, leaves, where)
        out = [None] * len(leaves)
        for i in plan.unit_leaves:
            out[i] = compact_lib.write_window(view[i], leaves[i].shape, where, num_masks)
        return out

    def shapes(plan, num_masks, leaves):
        """Shapes of the view and the dense part, for init (works on ShapeDtypeStruct)."""

        def struct(shape, x):
            return jax.ShapeDtypeStruct(shape, x.dtype)

        view = [compact_lib.MASKED] * len(leaves)
        dense = [compact_lib.MASKED] * len(leaves)
        for i, (x, role) in enumerate(zip(leaves, plan.roles, strict=True)):
            if role == layers_lib.UNIT:
                view[i] = struct(compact_lib.window_shape(x.shape, num_masks), x)
            elif role == layers_lib.STACKED:
                view[i] = struct((plan.num_layers // num_masks,) + x.shape[1:], x)
            elif role == layers_lib.ALWAYS:
                dense[i] = x
        if layers_lib.UNROLLED in plan.roles:
            positions = compact_lib.unrolled_positions(plan, leaves)
            for s in range(plan.num_layers // num_masks):
                for i in positions[s]:
                    view[i] = struct(leaves[i].shape, leaves[i])
        return view, dense

    def init_fn(params):
        if _is_placeholder(params):
            return OmgdCompactState(
                *_mask_fields(key), jnp.int32(-1), _NotParams(), _NotParams(), _NotParams()
            )
        leaves, treedef = jax.tree.flatten(params)
        plan = schedule.plan(params)
        view, dense = shapes(plan, schedule.masks_for(plan), leaves)
        active = inner.init(_zeros(jax.tree.unflatten(treedef, view)))
        dense_state = (
            inner.init(jax.tree.map(layers_lib.concrete, jax.tree.unflatten(treedef, dense)))
            if layer
            else optax.EmptyState()
        )
        mask_key, step = _mask_fields(key)
        ids = next_ids(plan, mask_key, step)
        return OmgdCompactState(mask_key, step, jnp.int32(-1), active, dense_state, ids)

    def next_ids(plan, key, step):
        """Layer ids trained by the update at ``step`` (empty unless layer granularity)."""
        if not layer:
            return jnp.zeros((0,), jnp.int32)
        num_masks = schedule.masks_for(plan)
        phase = schedule.phase(step, num_masks)
        pkey, _ = schedule.keys(key, phase)
        label = schedule.active_label(key, phase, num_masks)
        return schedule.layer_ids(pkey, plan.num_layers, label, num_masks).astype(jnp.int32)

    def update_fn(
        updates,
        state,
        params=None,
        *,
        mask_index=None,
        active_layers=None,
        num_layers=None,
        **extra_args,
    ):
        leaves, treedef = jax.tree.flatten(updates)
        p_leaves = None if params is None else treedef.flatten_up_to(params)
        # The lean step (omgd_jax.lean) hands the stacked leaves as [gamma, ...] views of the
        # layers `active_layers` of `num_layers`, gradients and parameters alike.
        lean = active_layers is not None
        if lean and (not layer or num_layers is None):
            raise ValueError(
                "active_layers= (the lean layer-wise step) needs granularity='layer' and "
                "num_layers= (the depth of the stack)"
            )
        plan = schedule.plan(updates)
        if lean:
            plan = dataclasses.replace(plan, num_layers=num_layers, num_units=num_layers)
        num_masks = schedule.masks_for(plan)
        phase = schedule.phase(state.omgd_step, num_masks, mask_index)
        pkey, _ = schedule.keys(state.omgd_key, phase)
        label = schedule.active_label(state.omgd_key, phase, num_masks)
        where = schedule.layer_ids(pkey, plan.num_layers, label, num_masks) if layer else label
        factor = float(num_masks) if schedule.scale else 1.0
        unflat = lambda xs: None if xs is None else jax.tree.unflatten(treedef, xs)

        view_shapes, _ = shapes(plan, num_masks, leaves)
        expected = jax.eval_shape(inner.init, unflat(view_shapes))  # trace-time check only
        if jax.tree.map(jnp.shape, expected) != jax.tree.map(jnp.shape, state.omgd_active_state):
            raise ValueError("omgd: the update tree does not match the tree given to init")

        def take(xs):
            if lean:  # already the views
                return [
                    x if r == layers_lib.STACKED else compact_lib.MASKED
                    for x, r in zip(xs, plan.roles, strict=True)
                ]
            return read(plan, num_masks, xs, where)

        g_view = [v if v is compact_lib.MASKED else v * factor for v in take(leaves)]
        p_view = None if p_leaves is None else take(p_leaves)
        fresh = inner.init(unflat(p_view) if p_view is not None else _zeros(unflat(g_view)))
        reset = phase.phase_id != state.omgd_phase  # the mask changed: restart the inner state
        old = jax.tree.map(lambda f, o: jnp.where(reset, f, o), fresh, state.omgd_active_state)
        u_view, new_active = inner.update(unflat(g_view), old, unflat(p_view), **extra_args)
        u_view = _materialise(treedef.flatten_up_to(u_view), reset)
        if lean:
            out = [u if r == layers_lib.STACKED else None for u, r in zip(u_view, plan.roles)]
        else:
            out = write(plan, num_masks, u_view, leaves, where)

        new_dense = state.omgd_dense_state
        if layer:
            dense = lambda xs: [
                x if r == layers_lib.ALWAYS else compact_lib.MASKED
                for x, r in zip(xs, plan.roles, strict=True)
            ]
            u_dense, new_dense = inner.update(
                unflat(dense(leaves)),
                state.omgd_dense_state,
                None if p_leaves is None else unflat(dense(p_leaves)),
                **extra_args,
            )
            u_dense = treedef.flatten_up_to(u_dense)
            out = [
                u_dense[i] if r == layers_lib.ALWAYS else x
                for i, (x, r) in enumerate(zip(out, plan.roles, strict=True))
            ]
        out = [
            g if r == layers_lib.SKIP else x
            for x, g, r in zip(out, leaves, plan.roles, strict=True)
        ]
        step = numerics.safe_increment(state.omgd_step)
        new_state = OmgdCompactState(
            state.omgd_key,
            step,
            phase.phase_id,
            new_active,
            new_dense,
            next_ids(plan, state.omgd_key, step),
        )
        return jax.tree.unflatten(treedef, out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _materialise(tree, pred):
    """``tree`` unchanged, computed before anything that consumes it.

    XLA:CPU would otherwise fuse the view's update into the full-size write, where its
    reads of the parameters' window keep the parameter update from happening in place (a
    full copy per leaf). The operands of a conditional are materialised; the identity
    branches cost one pass over the view.
    """
    return jax.lax.cond(pred, lambda t: t, lambda t: jax.tree.map(lambda x: x + 0, t), tree)


def _mask_fields(key):
    return canonical_key(key), jnp.zeros([], jnp.int32)


# ------------------------------------------------------------------------------------ frozen
def _frozen(schedule: MaskSchedule, inners_for, template, key):
    """``inners_for(params)``: the inner optimizer of every leaf (omgd_adamw varies the decay)."""

    def init_fn(params):
        if _is_placeholder(params):
            return OmgdFrozenState(*_mask_fields(key), template.init(params))
        leaves, treedef = jax.tree.flatten(params)
        plan = schedule.plan(params)
        inner_state = frozen_lib.init_units(inners_for(params), plan, leaves, treedef)
        return OmgdFrozenState(*_mask_fields(key), inner_state)

    def update_fn(updates, state, params=None, *, mask_index=None, **extra_args):
        leaves, treedef = jax.tree.flatten(updates)
        plan = schedule.plan(updates)
        factors = schedule.factors(plan, leaves, state.omgd_key, state.omgd_step, mask_index)
        p_leaves = None if params is None else treedef.flatten_up_to(params)
        inners = [
            optax.with_extra_args_support(t)
            for t in inners_for(updates if params is None else params)
        ]
        expected = jax.eval_shape(lambda: frozen_lib.init_units(inners, plan, leaves, treedef))
        if jax.tree.map(jnp.shape, expected) != jax.tree.map(jnp.shape, state.omgd_inner_state):
            raise ValueError("omgd: the update tree does not match the tree given to init")
        states = frozen_lib.split_units(template, plan, leaves, treedef, state.omgd_inner_state)
        out, new = frozen_lib.update_units(
            inners, plan, leaves, states, p_leaves, factors, extra_args
        )
        inner_state = frozen_lib.merge_units(plan, treedef, new)
        step = numerics.safe_increment(state.omgd_step)
        return jax.tree.unflatten(treedef, out), OmgdFrozenState(state.omgd_key, step, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------------------------------------- alias
def omgd_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any | None = None,
    weight_decay: float = 1e-4,
    mask: Any | None = None,
    *,
    nesterov: bool = False,
    num_masks: int | None = None,
    steps_per_mask: int = 1,
    state: str = "compact",
    key: jax.Array | int = 0,
    granularity: str = "element",
    traversal: str = "wor",
    scale: bool = True,
    warmup_steps: int = 0,
    layers: layers_lib.LayerSpec | None = None,
    layers_per_phase: int | None = None,
    layout: str = "contiguous",
    balance: str = "count",
    repartition: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """AdamW under OMGD: ``optax.adamw``'s arguments plus those of :func:`omgd`.

    For ``inject_hyperparams`` pass ``static_args=omgd_jax.static_args(omgd_jax.omgd_adamw)``.

    The learning rate (and its schedule) is applied after the wrapper, so it follows the global
    optimizer step whatever the inner counters do; Adam and the decoupled weight decay run
    inside. ``mask`` (a tree of bools or a callable on the params) selects the weights that
    are decayed, evaluated on the full parameter tree.

    Examples:
      >>> import jax.numpy as jnp, omgd_jax
      >>> tx = omgd_jax.omgd_adamw(1e-3, weight_decay=0.1, num_masks=4, steps_per_mask=10)
      >>> state = tx.init({"w": jnp.zeros((8, 8))})
    """

    def adam_with_decay(decay: bool, decay_mask=None):
        return optax.chain(
            optax.scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
            optax.add_decayed_weights(weight_decay, decay_mask) if decay else optax.identity(),
        )

    omgd_kwargs = dict(
        key=key,
        granularity=granularity,
        traversal=traversal,
        scale=scale,
        warmup_steps=warmup_steps,
        layers=layers,
        layers_per_phase=layers_per_phase,
        layout=layout,
        balance=balance,
        repartition=repartition,
    )
    tail = optax.scale_by_learning_rate(learning_rate)
    if state != "frozen":
        inner = adam_with_decay(True, mask)
        return optax.chain(omgd(inner, num_masks, steps_per_mask, state=state, **omgd_kwargs), tail)
    # frozen runs the inner optimizer leaf by leaf: decide the decay per leaf on the full tree.
    decayed, not_decayed = adam_with_decay(True), adam_with_decay(False)

    def inners_for(params):
        flags = mask(params) if callable(mask) else mask
        flat = [True] * len(jax.tree.leaves(params)) if flags is None else jax.tree.leaves(flags)
        return [decayed if f else not_decayed for f in flat]

    return optax.chain(
        omgd(
            decayed,
            num_masks,
            steps_per_mask,
            state="frozen",
            _inners_for=inners_for,
            **omgd_kwargs,
        ),
        tail,
    )
