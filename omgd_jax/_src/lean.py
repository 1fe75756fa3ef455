"""The lean layer-wise step: differentiate, store and update only the active layers.

Masking a gradient saves nothing in JAX: ``jax.grad`` over the whole tree computes and keeps the
weight gradient of every layer. The paper's memory (Table 8) comes from frozen layers needing no
weight gradients, no gradient buffer, no optimizer state and fewer saved activations, which
PyTorch gets from ``requires_grad=False``. This module gets it in one compiled program whose
active layers are traced data (one compilation for every phase), on top of
:func:`omgd_jax.scan_layers` (`layer_scan.py`):

* :func:`lean_value_and_grad` differentiates a loss that runs its stack through
  :func:`scan_layers`, and refuses (at trace time) a loss whose stack does not reach it;
* :func:`lean_train_step` adds the optimizer (the compact layer state of ``omgd``, handed
  ``layer_ids=LayerIds(ids, N_L)``), averages micro-batches inside the step, and writes the
  gamma updated layers into the donated stack in place (:func:`add_to_layers`);
  :func:`train_step` is the dense step with the same signature.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.custom_derivatives import SymbolicZero

from omgd_jax._src import layers as layers_lib
from omgd_jax._src import ordering, unit_slot
from omgd_jax._src.compact import LayerIds, OmgdCompactState
from omgd_jax._src.layer_scan import Registry, add_to_layers, leaf_names, take, train_only

# The name scope of the lean step's switch over the kinds of phase (layers, unit 0, ...,
# unit E-1) with units=; `benchmarks/flops.py` weights its branches by their share of a cycle.
PHASE_SCOPE = "omgd_phase"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _guard(paths, token, leaves):
    """The stacked leaves as they are; their cotangent must be zero (see `_guard_bwd`).

    ``token`` (a differentiated scalar) makes the leaves' uses differentiable, so any use of
    them outside `scan_layers`, whose backward gives the stack no cotangent, reaches here.
    """
    del paths, token
    return leaves


def _guard_fwd(paths, token, leaves):
    del paths, token
    return tuple(leaf.value for leaf in leaves), None


def _guard_bwd(paths, _, cts):
    used = [path for path, ct in zip(paths, cts, strict=True) if not isinstance(ct, SymbolicZero)]
    if used:
        raise ValueError(
            f"lean_value_and_grad: the stacked leaves {leaf_names(used)} are used outside "
            "omgd_jax.scan_layers too (a regularizer, tied weights, a second pass over the "
            "stack); the lean step differentiates the stack only through scan_layers and would "
            "drop that part of the gradient. Move that use into layer_fn, or train with "
            "jax.value_and_grad and the dense step"
        )
    return jnp.zeros((), jnp.float32), None


_guard.defvjp(_guard_fwd, _guard_bwd, symbolic_zeros=True)


# ------------------------------------------------------------------------- the step's pieces
def active_layers(opt_state) -> jax.Array:
    """The layer ids (int32[gamma]) the next ``update`` of a layer-wise OMGD state trains.

    ``opt_state`` is the state of (a chain or wrapper holding) ``omgd`` / ``omgd_adamw`` with
    ``granularity="layer", state="compact"`` (LISA, LISA-wor); it is found by its type,
    `OmgdCompactState`, wherever it sits (``chain``, ``inject_hyperparams``, ``MultiSteps``).
    The ids are traced data, so one compiled step serves every phase.
    """
    return _compact_field(
        opt_state,
        "omgd_layer_ids",
        "active_layers: opt_state must hold exactly one layer-wise compact OMGD state "
        "(omgd(..., granularity='layer', state='compact'), omgd_adamw, lisa or lisa_wor "
        "with state='compact')",
    )


def _compact_field(opt_state, field: str, refusal: str) -> jax.Array:
    """``field`` of the one `OmgdCompactState` in ``opt_state`` that holds it as an array (found
    by type, wherever it sits); ``refusal`` and the count found otherwise."""
    found = [
        getattr(s, field)
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, OmgdCompactState))
        if isinstance(s, OmgdCompactState)
        and isinstance(getattr(s, field), jax.Array | jax.ShapeDtypeStruct)
    ]
    if len(found) != 1:
        raise ValueError(f"{refusal}; found {len(found)}")
    return found[0]


def active_unit(opt_state) -> jax.Array:
    """The extra traversal unit (int32 scalar) the next ``update`` trains: ``e`` in 0..E-1 (the
    ``units=`` unit of that index, in `Plan.extra_names` order), or -1 in a layers phase.

    ``opt_state`` holds a layer-wise compact OMGD state built with ``units=``; found by its
    type, as :func:`active_layers` finds the layer ids. While it is ``>= 0`` the layer ids are
    valid but not trained.
    """
    return _compact_field(
        opt_state,
        "omgd_unit",
        "active_unit: opt_state must hold exactly one layer-wise compact OMGD state built "
        "with units= (the lean step was given units=, so the optimizer must be too, with "
        "the same spec)",
    )


def _plan(
    params,
    layers: layers_lib.LayerSpec,
    units: layers_lib.UnitSpec | None = None,
    frozen: layers_lib.FrozenSpec | None = None,
) -> layers_lib.Plan:
    """The layer plan of ``params``, refusing unrolled layers (the lean step needs a stack)."""
    plan = layers_lib.plan_layers(params, layers, units, frozen)
    if layers_lib.UNROLLED in plan.roles:
        raise ValueError(
            "the lean layer-wise step needs stacked layers (a leading layer axis, as nnx.scan / "
            "nnx.vmap make them); layers= selects unrolled layers"
        )
    if layers_lib.STACKED not in plan.roles:
        raise ValueError(
            "the lean layer-wise step: layers= selects no stacked leaf of params (their key "
            "paths are '/'-joined, e.g. 'blocks/attn/kernel')"
        )
    return plan


def _view(plan, params, ids):
    leaves, treedef = jax.tree.flatten(params)
    out = [
        take(x, ids) if r == layers_lib.STACKED else x
        for x, r in zip(leaves, plan.roles, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def layer_view(
    params,
    ids: jax.Array,
    *,
    layers: layers_lib.LayerSpec,
    units: layers_lib.UnitSpec | None = None,
    frozen: layers_lib.FrozenSpec | None = None,
):
    """``params`` with every stacked leaf replaced by its ``[gamma, ...]`` active layers.

    The optimizer runs on it (``tx.update(grads, state, view, layer_ids=LayerIds(ids, N_L))``)
    and `apply_layer_updates` writes it back. ``units`` / ``frozen``: the optimizer's specs
    (checked the same way; the extra units' and frozen leaves are in the view in full).
    """
    return _view(_plan(params, layers, units, frozen), params, ids)


def _value_and_grad(fun, plan, has_aux, params, ids, args, kwargs, unit=None):
    """(value, grads) of ``fun``: the always-active leaves, the stack's views (a layers phase)
    and the leaves of extra unit ``unit`` (its phase) differentiated; frozen leaves never."""
    value, parts = _value_and_grad_parts(fun, plan, has_aux, params, ids, args, kwargs, unit)
    return value, _grads_of_parts(plan, params, parts, ids, unit)


def _grads_of_parts(plan, params, parts, ids, unit):
    """The gradient tree of `_value_and_grad_parts`' parts: the stack's views and the extra
    units' leaves read out of the packed buffer (zeros but in their phase: elementwise
    selects, which consumers fuse), frozen and non-float leaves zeros."""
    leaves, treedef = jax.tree.flatten(params)
    got, packed = parts
    out = dict(got)
    if plan.num_extra:
        layout, part_of = _phase_layout(plan, leaves, ids)
        out |= unit_slot.unpack_active(layout, packed, jnp.asarray(unit, jnp.int32) + 1, part_of)
    # Frozen and non-float leaves: zeros, never differentiated (the compact update reads only
    # their shape; a zero of no consumer costs nothing).
    full = [out[i] if i in out else jnp.zeros_like(x) for i, x in enumerate(leaves)]
    return jax.tree.unflatten(treedef, full)


def _phase_layout(plan, leaves, ids):
    """The packed buffer the kinds of phase hand their gradient out in (``unit_slot``, flat):
    part 0 the stack's ``[gamma, ...]`` views (a layers phase), part e + 1 the leaves of extra
    unit e; and every leaf's part (-1: in no part)."""
    part_of = [
        0 if r == layers_lib.STACKED else plan.unit_of[i] + 1 if r == layers_lib.EXTRA else -1
        for i, r in enumerate(plan.roles)
    ]
    shape = lambda i: (  # noqa: E731
        (ids.shape[0],) + leaves[i].shape[1:] if plan.roles[i] == layers_lib.STACKED
        else leaves[i].shape
    )  # fmt: skip
    parts = [
        [jax.ShapeDtypeStruct(shape(i), leaves[i].dtype) for i, q in enumerate(part_of) if q == k]
        for k in range(plan.num_extra + 1)
    ]
    return unit_slot.slot_layout(lambda t: t, parts, flat=True), part_of


def _value_and_grad_parts(fun, plan, has_aux, params, ids, args, kwargs, unit=None):
    """(value, (grads, packed)): ``grads`` maps leaf index to gradient for the always-active
    leaves; ``packed`` what the phase trains, the stack's ``[gamma, ...]`` views or the leaves
    of one extra unit, in one buffer per dtype as long as the largest of them
    (`_phase_layout`; without extra units, ``grads`` holds the views too and ``packed`` is
    {}). Arrays only, so micro-batches sum them as they are.

    Without extra units (``plan.num_extra == 0``) one differentiation; with them, one per kind
    of phase (layers, unit 0, ..., unit E-1), run by a ``lax.switch`` on ``unit + 1``: each
    branch differentiates only what its phase trains, so an inactive unit gets no gradient
    work, and the other leaves' gradients are zeros. A branch's outputs are buffers of their
    own, so the phase hands its gradient out packed in one buffer as long as the largest
    part, not a buffer for the views and a full-size one per unit (all of them allocated in
    every phase).
    """
    leaves, treedef = jax.tree.flatten(params)
    roles = plan.roles
    ids = jnp.asarray(ids, jnp.int32)
    stack = [i for i, r in enumerate(roles) if r == layers_lib.STACKED]
    paths = tuple(
        layers_lib.path_str(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    )

    def view_zeros(i):
        return jnp.zeros((ids.shape[0],) + leaves[i].shape[1:], leaves[i].dtype)

    def grads_of(kind):
        """``kind`` None: a layers phase; ``e``: the phase of extra unit e."""
        train = [
            i
            for i, r in enumerate(roles)
            if r == layers_lib.ALWAYS
            or (r == layers_lib.STACKED and kind is None)
            or (r == layers_lib.EXTRA and kind is not None and plan.unit_of[i] == kind)
        ]

        def loss(trainable, token):
            full = list(leaves)
            for i, x in zip(train, trainable, strict=True):
                if roles[i] != layers_lib.STACKED:
                    full[i] = x
            guarded = _guard(tuple(paths[i] for i in stack), token, tuple(leaves[i] for i in stack))
            for i, x in zip(stack, guarded, strict=True):
                full[i] = x
            # A unit's phase: the views are not differentiated, so scan_layers computes no
            # weight cotangent (and no backward at all when the stack's input does not depend
            # on what the phase trains).
            view = [trainable[train.index(i)] if kind is None else view_zeros(i) for i in stack]
            with train_only(Registry(guarded, view, ids, [paths[i] for i in stack])) as registry:
                out = fun(jax.tree.unflatten(treedef, full), *args, **kwargs)
            registry.check_all_found()
            return out

        # The views are only differentiation points: scan_layers reads the weights from the
        # stack, so these zeros are never read and XLA does not allocate them.
        point = [view_zeros(i) if roles[i] == layers_lib.STACKED else leaves[i] for i in train]
        value, (g, _) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=has_aux)(
            point, jnp.zeros((), jnp.float32)
        )
        return value, dict(zip(train, g, strict=True))

    if not plan.num_extra:
        value, got = grads_of(None)
        return value, (got, {})
    # Every branch gives the same outputs: the always-active leaves' gradients, and what the
    # phase trains (the views or a unit's leaves) packed in one buffer as long as the largest
    # part: a branch's outputs are buffers of their own, and separate outputs for the views
    # and every unit would all be allocated in every phase.
    always = [i for i, r in enumerate(roles) if r == layers_lib.ALWAYS]
    layout, part_of = _phase_layout(plan, leaves, ids)

    def branch(kind):
        value, got = grads_of(kind)
        part = 0 if kind is None else kind + 1
        mine = [got[i] for i, q in enumerate(part_of) if q == part]
        packed = unit_slot.write_unit(layout, unit_slot.empty_slot(layout), part, mine)
        return value, [got[i] for i in always], packed

    with jax.named_scope(PHASE_SCOPE):  # names the switch in jaxprs and profiles
        value, g, packed = jax.lax.switch(
            jnp.asarray(unit, jnp.int32) + 1,
            [functools.partial(branch, None)]
            + [functools.partial(branch, e) for e in range(plan.num_extra)],
        )
    return value, (dict(zip(always, g, strict=True)), packed)


def lean_value_and_grad(
    fun: Callable,
    *,
    layers: layers_lib.LayerSpec,
    has_aux: bool = False,
    units: layers_lib.UnitSpec | None = None,
    frozen: layers_lib.FrozenSpec | None = None,
):
    r"""``jax.value_and_grad(fun)`` that differentiates only the active layers of a stack.

    ``fun(params, *args)`` computes a scalar loss and runs the stacked layers of ``params``
    (the leaves matched by ``layers``) through :func:`scan_layers`, directly or through a
    model that does. The returned function takes ``(params, ids, *args)`` and gives
    ``(value, grads)``: ``grads`` holds the always-active leaves in full and, for every stacked
    leaf, the ``[gamma, ...]`` gradient of layers ``ids`` (slot ``s`` for layer ``ids[s]``):
    the structure of ``layer_view(params, ids, layers=layers)``. No ``[N_L, ...]`` gradient is
    built and inactive layers get no weight-gradient work.

    .. math::
        \mathrm{grads}[\text{leaf}][s] = \frac{\partial\,\mathrm{fun}}{\partial\,
        \text{leaf}[\mathrm{ids}_s]}

    It never trains nothing silently: a loss that does not hand the stacked leaves of
    ``params`` themselves to :func:`scan_layers` (it never calls it, or casts, scales or
    constrains the stack first) or that also uses them elsewhere raises a ``ValueError`` at
    trace time naming the leaves and the fix (cast inside ``layer_fn``, which sees one layer).

    Units beyond the layers (the optimizer's ``units=`` / ``frozen=``, same specs): ``frozen``
    leaves are never differentiated (their gradient is zeros, which the compact update reads
    for its shape only). With ``units``, the function takes the active unit too,
    ``f(params, ids, unit, *args)`` (``unit``: int32, :func:`active_unit` of the state, -1 in
    a layers phase), and differentiates only what that phase trains: the always-active leaves
    and either the layers ``ids`` or the leaves of extra unit ``unit``; every other leaf's
    gradient is zeros. One compiled program serves every phase (a ``lax.switch`` on the kind
    of phase, each branch its own backward pass).

    The rule for what lies upstream of the stack is JAX's own: the stack's input ``x`` gets a
    cotangent exactly when, in the phase's differentiation, ``x`` depends on a differentiated
    leaf (:func:`scan_layers` sees whether its input is perturbed). So whatever the model,
    every gradient returned for what is trained equals the slice of ``jax.grad``: a phase
    whose trained leaves are all downstream of the stack (the head, the final norm) runs no
    backward through the blocks at all; a layers phase whose input is not differentiated (the
    embedding an extra unit or frozen, nothing always-active before the stack) does no work
    below its lowest active layer (no recompute, no input cotangent); an embedding phase runs
    the input cotangents down the whole stack, without a weight cotangent.

    Args:
      fun: the loss, ``fun(params, *args) -> loss`` (or ``(loss, aux)`` with ``has_aux``).
      layers: regex on the '/'-joined key path (or callable) selecting the stacked leaves, as
        for ``omgd(..., granularity="layer")``.
      has_aux: as for ``jax.value_and_grad``.
      units: the extra traversal units, as given to the optimizer (None: none).
      frozen: the never-trained leaves, as given to the optimizer (None: none).

    Returns:
      ``f(params, ids, *args) -> (value, grads)``; with ``units``,
      ``f(params, ids, unit, *args)``.

    Examples:
      >>> import jax, jax.numpy as jnp, omgd_jax
      >>> params = {"blocks": {"w": jnp.arange(1.0, 5.0)}, "out": jnp.array(1.0)}
      >>> def loss(p, x):  # 4 scalar layers x -> w x, then a scale
      ...     f = lambda layer, h: layer["w"] * h
      ...     return p["out"] * omgd_jax.scan_layers(f, p["blocks"], x)
      >>> value, grads = omgd_jax.lean_value_and_grad(loss, layers="^blocks/")(
      ...     params, jnp.array([1, 3]), 1.0)
      >>> print(value, grads["blocks"]["w"], grads["out"])  # d/dw_1 = 1*3*4, d/dw_3 = 1*2*3
      24.0 [12.  6.] 24.0
    """

    if units is not None:

        def with_unit(params, ids, unit, *args, **kwargs):
            plan = _plan(params, layers, units, frozen)
            return _value_and_grad(fun, plan, has_aux, params, ids, args, kwargs, unit)

        return with_unit

    def wrapped(params, ids, *args, **kwargs):
        plan = _plan(params, layers, None, frozen)
        return _value_and_grad(fun, plan, has_aux, params, ids, args, kwargs)

    return wrapped


def _apply(plan, params, params_view, updates, ids):
    leaves, treedef = jax.tree.flatten(params)
    treedef.flatten_up_to(params_view)  # the same tree as params, or a clear error
    upd = treedef.flatten_up_to(updates)
    out = []
    for x, u, r in zip(leaves, upd, plan.roles, strict=True):
        if r == layers_lib.STACKED:
            out.append(add_to_layers(x, u, ids))
        elif r in (layers_lib.ALWAYS, layers_lib.EXTRA):
            out.append(optax.apply_updates(x, u))
        else:
            out.append(x)
    return jax.tree.unflatten(treedef, out)


def apply_layer_updates(
    params,
    params_view,
    updates,
    ids: jax.Array,
    *,
    layers,
    units: layers_lib.UnitSpec | None = None,
    frozen: layers_lib.FrozenSpec | None = None,
):
    """New parameters: the always-active leaves plus their update, the active layers of every
    stack plus theirs, written in place (``params`` donated: gamma layers touched, the rest
    bit-for-bit kept), each sum taken as ``optax.apply_updates`` takes it. The extra units'
    leaves (``units``) take their update as the always-active ones do (zeros outside their
    phase); ``frozen`` leaves are kept as they are, their update not read.

    ``params_view`` is the `layer_view` the optimizer was given; its structure is checked, and
    the layers are read again from ``params`` where they are written (`add_to_layers`), which
    keeps the write in place and the view out of the write.
    """
    return _apply(_plan(params, layers, units, frozen), params, params_view, updates, ids)


def _check_microbatches(microbatches) -> int | None:
    if microbatches is None:
        return None
    if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"microbatches must be None or an int >= 1, got {microbatches!r}")
    return microbatches


def _accumulate(grad_fn, microbatches, args):
    """``grad_fn(*args)`` (value, grads), averaged over the leading micro-batch axis of every
    leaf of ``args`` when ``microbatches`` is set (a ``lax.scan``: one micro-batch's
    activations live at a time)."""
    if microbatches is None:
        return grad_fn(*args)
    for leaf in jax.tree.leaves(args):
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != microbatches:
            raise ValueError(
                f"microbatches={microbatches}: every array argument must lead with a "
                f"micro-batch axis of that size, got shape {jnp.shape(leaf)}"
            )
    if microbatches == 1:
        return grad_fn(*jax.tree.map(lambda a: a[0], args))

    def micro(carry, batch):
        return jax.tree.map(jnp.add, carry, grad_fn(*batch)), None

    first = jax.tree.map(lambda a: a[0], args)
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, *first))
    total, _ = jax.lax.scan(micro, zero, args)
    return jax.tree.map(lambda g: g / microbatches, total)


def train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    microbatches: int | None = None,
):
    r"""The dense training step: ``step(params, opt_state, *args)``, the reference the lean
    step is measured against.

    .. math::
        g = \frac{1}{K}\sum_{k=1}^{K} \nabla_\theta\, \mathrm{loss\_fn}(\theta, b_k),\qquad
        (u, s) \leftarrow \mathrm{tx.update}(g, s, \theta),\qquad \theta \leftarrow \theta + u

    Args:
      loss_fn: ``loss_fn(params, *args) -> loss`` (or ``(loss, aux)`` with ``has_aux``).
      tx: any optax transformation.
      has_aux: ``loss_fn`` returns ``(loss, aux)``.
      microbatches: ``K``: every array of ``args`` leads with a micro-batch axis of size K and
        the gradient is averaged over it inside the step (a ``lax.scan``); None: ``args`` are
        one batch.

    Returns:
      ``step(params, opt_state, *args) -> (params, opt_state, value)``; ``value`` is the loss
      (averaged over the micro-batches), or ``(loss, aux)``. Jit it with
      ``donate_argnums=(0, 1)``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, omgd_jax
      >>> loss = lambda p, x: jnp.mean((p["w"] * x - 1.0) ** 2)
      >>> tx = optax.sgd(0.5)
      >>> params = {"w": jnp.array(0.0)}
      >>> step = jax.jit(omgd_jax.train_step(loss, tx, microbatches=2))
      >>> params, state, value = step(params, tx.init(params), jnp.ones((2, 3)))  # 2 x 3 rows
      >>> print(value, params["w"])  # gradient -2, so w = 0 + 0.5 * 2
      1.0 1.0

    References:
      optax's training loop, https://optax.readthedocs.io (``update`` then ``apply_updates``).
    """
    microbatches = _check_microbatches(microbatches)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def step(params, opt_state, *args):
        value, grads = _accumulate(lambda *a: grad_fn(params, *a), microbatches, args)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


def lean_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    layers: layers_lib.LayerSpec,
    has_aux: bool = False,
    microbatches: int | None = None,
    units: layers_lib.UnitSpec | None = None,
    frozen: layers_lib.FrozenSpec | None = None,
):
    r"""One lean layer-wise training step: ``step(params, opt_state, *args)``.

    Reads the active layers from ``opt_state`` (:func:`active_layers`), differentiates only
    them (:func:`lean_value_and_grad`, averaged over ``microbatches`` inside the step), runs
    ``tx`` on the always-active leaves and the ``[gamma, ...]`` views (handing it
    ``layer_ids=LayerIds(ids, N_L)``), and writes the updated layers into ``params`` in place.
    ``tx`` must hold a layer-wise compact OMGD state (``omgd_adamw(..., granularity="layer",
    layers=layers)``, LISA); transformations chained before it (global-norm clipping) see the
    trained share only, as in PyTorch where frozen layers have no gradient.

    Jit it once with ``donate_argnums=(0, 1)``: the active ids are traced data, so every phase
    runs the same compiled program. The update is the dense compact path's, restricted to what
    it touches:

    .. math::
        \theta^{(l)} \leftarrow \theta^{(l)} + \mathrm{tx}\big(\tfrac{N_L}{\gamma}
        \tfrac{1}{K}\textstyle\sum_k \nabla_{\theta^{(l)}} f(\theta, b_k)\big)
        \ \ (l \in \mathrm{ids}), \qquad
        \theta^{(l)} \text{ unchanged } (l \notin \mathrm{ids}),

    the always-active leaves updated every step with scale 1.

    Args:
      loss_fn: ``loss_fn(params, *args) -> loss`` whose model runs the stacked layers through
        :func:`scan_layers` (anything else raises, see :func:`lean_value_and_grad`).
      tx: the optimizer, holding a layer-wise compact OMGD state.
      layers: regex (or callable) selecting the stacked leaves, as given to ``tx``.
      has_aux: ``loss_fn`` returns ``(loss, aux)``.
      microbatches: ``K``: every array of ``args`` leads with a micro-batch axis of size K and
        the gradient is averaged over it inside the one compiled step; None: one batch.
      units: the extra traversal units, the spec given to ``tx`` (None: none). The step reads
        the phase's unit from ``opt_state`` (:func:`active_unit`) and differentiates only what
        the phase trains (see :func:`lean_value_and_grad` for the rule on what lies upstream
        of the stack): an inactive unit gets no gradient work, a head phase no backward
        through the blocks, a layers phase with the embedding untrained no work below its
        lowest active layer.
      frozen: the never-trained leaves, the spec given to ``tx``: never differentiated, never
        written.

    Returns:
      ``step(params, opt_state, *args) -> (params, opt_state, value)`` where ``value`` is the
      loss (or ``(loss, aux)`` with ``has_aux``).

    Examples:
      >>> import jax, jax.numpy as jnp, omgd_jax
      >>> params = {"blocks": {"w": jnp.ones(4)}, "out": jnp.array(1.0)}
      >>> def loss(p, x):
      ...     h = omgd_jax.scan_layers(lambda layer, h: layer["w"] * h, p["blocks"], x)
      ...     return (p["out"] * h - 2.0) ** 2
      >>> tx = omgd_jax.omgd_adamw(0.1, weight_decay=0.0, granularity="layer",
      ...                          layers="^blocks/", layers_per_phase=1, steps_per_mask=1)
      >>> state = tx.init(params)
      >>> step = jax.jit(omgd_jax.lean_train_step(loss, tx, layers="^blocks/"))
      >>> ids = omgd_jax.active_layers(state)
      >>> params, state, value = step(params, state, 1.0)
      >>> moved = params["blocks"]["w"] != 1.0
      >>> print(value, moved.sum(), bool(moved[ids[0]]))  # one block trained, the others kept
      1.0 1 True

    References:
      Yang et al., Omni-Masked Gradient Descent, arXiv 2603.05960, 2026 (Algorithm 2).
    """
    microbatches = _check_microbatches(microbatches)

    def step(params, opt_state, *args):
        plan = _plan(params, layers, units, frozen)  # once per trace
        ids = active_layers(opt_state)
        unit = active_unit(opt_state) if plan.num_extra else None
        # Micro-batches sum the parts: the extra units' gradients stay packed in the carry.
        value, parts = _accumulate(
            lambda *a: _value_and_grad_parts(loss_fn, plan, has_aux, params, ids, a, {}, unit),
            microbatches,
            args,
        )
        grads = _grads_of_parts(plan, params, parts, ids, unit)
        stacked = [
            g
            for g, r in zip(jax.tree.leaves(grads), plan.roles, strict=True)
            if r == layers_lib.STACKED
        ]
        view = _view(plan, params, ordering.ids_after(ids, stacked))
        updates, opt_state = tx.update(
            grads, opt_state, view, layer_ids=LayerIds(ids, plan.num_layers)
        )
        return _apply(plan, params, view, updates, ids), opt_state, value

    return step
