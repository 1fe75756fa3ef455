"""``omgd(..., state="frozen")``: per-unit inner state, PyTorch's behaviour in the paper's code.

In the released code an inactive parameter gets no gradient, so AdamW skips it: its value, its
moments and its own step count stay as they were, and it is not decayed. To reproduce that for
any optax optimizer, the inner optimizer runs on every unit separately (every leaf; every layer
of a stacked leaf, through `jax.vmap`), so every unit has its own step counter, and the new state
of an inactive unit is discarded with `jnp.where`.

The per-leaf states are stored transposed, with the structure of ``inner.init(params)`` (a
params-shaped tree where optax has one, a params-shaped tree of counters where it has a scalar),
so that `optax.tree.map_params` and `optax.tree.get` see a familiar state.

Layer granularity with ``units=``: every leaf of an extra unit is a unit of its own state (as
an always-active leaf is), active in the one phase of the cycle that trains its unit and frozen
in the others. ``frozen=`` leaves have no inner state at all (like non-floating leaves) and an
update of zeros.

`omgd_frozen` is the transformation and `OmgdFrozenState` its state; the functions below it run
the inner optimizer unit by unit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from omgd_jax._src import layers as layers_lib
from omgd_jax._src.placeholder import NotParams, is_params_placeholder
from omgd_jax._src.schedule import MaskSchedule, check_key
from omgd_jax._src.transforms import check_units_record, init_mask_state, next_unit


class OmgdFrozenState(NamedTuple):
    """State of ``omgd(..., state="frozen")``: full inner state, one per unit."""

    omgd_key: jax.Array  # typed PRNG key of the masks, as in `OmgdMaskState`.
    omgd_step: jax.Array  # int32, optimizer steps taken.
    omgd_inner_state: Any  # inner state per leaf (per layer for stacked leaves), transposed.
    omgd_unit: Any = optax.EmptyState()  # with units=: int32, the extra unit the next update
    # trains (-1: a layers phase); EmptyState() without extra units.


def omgd_frozen(
    inner: optax.GradientTransformation,
    schedule: MaskSchedule,
    key: jax.Array | int,
    *,
    inners_for_leaves: Callable[[Any], Sequence[optax.GradientTransformation]] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """``omgd(inner, ..., state="frozen")`` for a built schedule; see :func:`omgd_jax.omgd`.

    Args:
      inner: the inner optimizer of every leaf, unless ``inners_for_leaves`` is given; its
        state on a placeholder is what `optax.tree.map_params` sees.
      schedule: the masks.
      key: PRNG key or int seed of the masks.
      inners_for_leaves: ``params -> [inner optimizer of every leaf]`` (in `jax.tree.leaves`
        order), evaluated on the full parameter tree: `omgd_adamw` decays some leaves and not
        others. Every leaf's inner state must have the same structure as ``inner``'s.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra args are forwarded to the inners.
    """
    check_key(key)
    inner = optax.with_extra_args_support(inner)
    if inners_for_leaves is None:
        inners_for_leaves = lambda params: [inner] * len(jax.tree.leaves(params))

    def init_fn(params):
        mask_fields = init_mask_state(key)
        if is_params_placeholder(params):
            unit = NotParams() if schedule.units is not None else optax.EmptyState()
            return OmgdFrozenState(*mask_fields, inner.init(params), unit)
        leaves, treedef = jax.tree.flatten(params)
        plan = schedule.plan(params)
        inner_state = init_units(inners_for_leaves(params), plan, leaves, treedef)
        unit = next_unit(schedule, plan, mask_fields.omgd_key, mask_fields.omgd_step)
        return OmgdFrozenState(*mask_fields, inner_state, unit)

    def update_fn(updates, state, params=None, *, mask_index=None, **extra_args):
        leaves, treedef = jax.tree.flatten(updates)
        plan = schedule.plan(updates)
        check_units_record(plan, state.omgd_unit, schedule.units)
        factors = schedule.factors(plan, leaves, state.omgd_key, state.omgd_step, mask_index)
        p_leaves = None if params is None else treedef.flatten_up_to(params)
        inners = [
            optax.with_extra_args_support(t)
            for t in inners_for_leaves(updates if params is None else params)
        ]
        expected = jax.eval_shape(lambda: init_units(inners, plan, leaves, treedef))
        if jax.tree.map(jnp.shape, expected) != jax.tree.map(jnp.shape, state.omgd_inner_state):
            raise ValueError("omgd: the update tree does not match the tree given to init")
        states = split_units(inner, plan, leaves, treedef, state.omgd_inner_state)
        out, new = update_units(inners, plan, leaves, states, p_leaves, factors, extra_args)
        step = optax.safe_increment(state.omgd_step)
        new_state = OmgdFrozenState(
            omgd_key=state.omgd_key,
            omgd_step=step,
            omgd_inner_state=merge_units(plan, treedef, new),
            omgd_unit=next_unit(schedule, plan, state.omgd_key, step),
        )
        return jax.tree.unflatten(treedef, out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _stacked(plan: layers_lib.Plan, i: int) -> bool:
    return plan.roles[i] == layers_lib.STACKED


def _stateless(role: str) -> bool:
    """Leaves without inner state: non-floating ones and ``frozen=`` ones."""
    return role in (layers_lib.SKIP, layers_lib.FROZEN)


def outer_structure(plan: layers_lib.Plan, treedef) -> jax.tree_util.PyTreeDef:
    """The params treedef with non-floating and frozen leaves removed (MaskedNode)."""
    leaves = [optax.MaskedNode() if _stateless(r) else 0 for r in plan.roles]
    return jax.tree.structure(jax.tree.unflatten(treedef, leaves))


def init_units(inners, plan: layers_lib.Plan, leaves, treedef):
    """Runs ``inners[i].init`` on every floating leaf (vmapped over stacked layers), transposed."""
    states = []
    for i, (inner, leaf) in enumerate(zip(inners, leaves, strict=True)):
        if _stateless(plan.roles[i]):
            continue
        init = jax.vmap(inner.init) if _stacked(plan, i) else inner.init
        states.append(init(layers_lib.concrete(leaf)))
    inner_defs = {jax.tree.structure(s) for s in states}
    if len(inner_defs) != 1:
        raise ValueError(
            "state='frozen' runs the inner optimizer leaf by leaf, so its state must have the same "
            "structure for every leaf; an optax.masked inside it breaks that. Give the mask to "
            "omgd_adamw(mask=...) or use state='compact'"
        )
    inner_def = inner_defs.pop()
    if inner_def.num_leaves == 0:  # a stateless inner optimizer: nothing to transpose
        return states[0]
    outer = outer_structure(plan, treedef)
    return jax.tree.transpose(outer, inner_def, jax.tree.unflatten(outer, states))


def split_units(inner, plan, leaves, treedef, state) -> list:
    """Inverse of `init_units`' transposition: the per-leaf inner states (None for SKIP)."""
    first = next(i for i, r in enumerate(plan.roles) if not _stateless(r))
    template = jax.eval_shape(
        jax.vmap(inner.init) if _stacked(plan, first) else inner.init,
        jax.ShapeDtypeStruct(leaves[first].shape, leaves[first].dtype),
    )
    outer = outer_structure(plan, treedef)
    if jax.tree.structure(template).num_leaves == 0:
        return [None if _stateless(r) else state for r in plan.roles]
    try:
        per_leaf = outer.flatten_up_to(
            jax.tree.transpose(jax.tree.structure(template), outer, state)
        )
    except (ValueError, TypeError) as err:
        raise ValueError(
            "omgd: the update tree does not match the tree given to init "
            f"({outer.num_leaves} floating leaves expected): {err}"
        ) from None
    it = iter(per_leaf)
    return [None if _stateless(r) else next(it) for r in plan.roles]


def _keep(active: jax.Array, new: jax.Array, old: jax.Array, stacked: bool) -> jax.Array:
    """``new`` where the unit is active, ``old`` elsewhere, broadcasting ``active`` sensibly."""
    if active.ndim == 0:
        return jnp.where(active, new, old)
    if stacked:  # active: (N_L, 1, ..); state leaves of a vmapped init lead with N_L.
        return jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    if active.ndim == new.ndim:  # element granularity: moments freeze per coordinate.
        return jnp.where(active, new, old)
    return jnp.where(jnp.any(active), new, old)  # counters etc. advance while any entry trains


def update_units(inners, plan, grads, states, params, factors, extra_args):
    """One step of every unit's inner optimizer; inactive units keep their state, update 0."""
    updates, new_states = [], []
    for i, g in enumerate(grads):
        if _stateless(plan.roles[i]):
            updates.append(jnp.zeros_like(g) if plan.roles[i] == layers_lib.FROZEN else g)
            new_states.append(None)
            continue
        factor, stacked = factors[i], _stacked(plan, i)
        p = None if params is None else params[i]

        def step(g, s, p, inner=inners[i]):
            return inner.update(g, s, p, **extra_args)

        fn = jax.vmap(step, in_axes=(0, 0, None if p is None else 0)) if stacked else step
        u, s = fn(g if factor is None else g * factor, states[i], p)
        if factor is not None:
            active = factor != 0
            u = jnp.where(active, u, jnp.zeros_like(u))
            s = jax.tree.map(lambda n, o, a=active, st=stacked: _keep(a, n, o, st), s, states[i])
        updates.append(u)
        new_states.append(s)
    return updates, new_states


def merge_units(plan, treedef, states):
    """Transposes per-leaf states back into the stored layout."""
    outer = outer_structure(plan, treedef)
    kept = [s for s in states if s is not None]
    inner_def = jax.tree.structure(kept[0])
    if inner_def.num_leaves == 0:
        return kept[0]
    return jax.tree.transpose(outer, inner_def, jax.tree.unflatten(outer, kept))
