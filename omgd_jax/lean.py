"""The lean layer-wise step: differentiate, store and update only the active layers.

Masking a gradient saves nothing in JAX: ``jax.grad`` over the whole tree computes and keeps the
weight gradient of every layer. The paper's memory (Table 8) comes from frozen layers needing no
weight gradients, no gradient buffer, no optimizer state and fewer saved activations, which
PyTorch gets from ``requires_grad=False``. This module gets it in one compiled program whose
active layers are traced data (one compilation for every phase):

* :func:`scan_layers` runs a stack of layers (every leaf of ``stack`` leads with the layer axis
  N_L) under a custom backward pass. Its weight cotangent is the ``[gamma, ...]`` ``view`` of the
  active layers ``ids``; the backward of an inactive layer computes only the cotangent of its
  input, so it skips the x^T dy matmuls, and no ``[N_L, ...]`` gradient is ever built.
* :func:`lean_value_and_grad` differentiates a loss that runs its stack through
  :func:`scan_layers`; :func:`lean_train_step` adds the optimizer (the compact layer state of
  ``omgd``) and writes the gamma updated layers into the donated stack in place
  (:func:`add_to_layers`).

What each layer keeps for the backward pass:

* ``remat=True``: only its input (N_L x the activation entering a layer). The backward
  recomputes every layer once, inside a ``lax.cond`` on whether it is active: an inactive
  layer gives its input cotangent alone (no weight-gradient matmuls), an active one its
  weight cotangent too, written into its slot of the ``[gamma, ...]`` gradient. Least memory.
* ``remat=False``: the residuals of its linearisation (what ``jax.vjp`` keeps, weights not
  copied), as an ordinary backward pass would; residuals that depend on neither the weights
  nor the input (a causal mask built in the layer) are kept once for all layers. No
  recomputation; inactive layers still skip the weight-gradient matmuls (XLA removes them as
  dead code of the inactive branch).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.extend import core as jex_core

from omgd_jax import layers as layers_lib

LayerFn = Callable[[Any, jax.Array], jax.Array]

# Set by `lean_value_and_grad` while it traces the loss: id(stack leaf) -> (view leaf, ids).
# It lets a model that calls `scan_layers(layer_fn, stack, x)` train only the active layers
# without being handed the view explicitly. Keyed by identity: the tracers of this one trace.
_TRAINABLE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("omgd_lean", default=None)


@contextlib.contextmanager
def _train_only(stack_leaves, view_leaves, ids):
    token = _TRAINABLE.set(
        {id(a): (v, ids) for a, v in zip(stack_leaves, view_leaves, strict=True)}
    )
    try:
        yield
    finally:
        _TRAINABLE.reset(token)


def _trainable_view(stack):
    """(view, ids) registered for ``stack`` by an enclosing `lean_value_and_grad`, or Nones."""
    table = _TRAINABLE.get()
    leaves, treedef = jax.tree.flatten(stack)
    if not table or not leaves or any(id(a) not in table for a in leaves):
        return None, None
    found = [table[id(a)] for a in leaves]
    return jax.tree.unflatten(treedef, [v for v, _ in found]), found[0][1]


def gather_layers(stack, ids: jax.Array):
    """The ``[gamma, ...]`` view of layers ``ids`` of every leaf of ``stack``."""
    return jax.tree.map(lambda a: _take(a, ids), stack)


def scatter_layers(stack, view, ids: jax.Array):
    """``stack`` with layers ``ids`` replaced by ``view`` (in place when ``stack`` is donated)."""

    def one(a, v):
        for s in range(ids.shape[0]):
            a = jax.lax.dynamic_update_index_in_dim(a, v[s].astype(a.dtype), ids[s], 0)
        return a

    return jax.tree.map(one, stack, view)


def add_to_layers(stack, updates, ids: jax.Array):
    """``stack`` with ``updates[s]`` added to layer ``ids[s]`` (in place when ``stack`` is
    donated), as ``optax.apply_updates`` adds them: in the promoted dtype, cast back.

    An update of the stack's dtype is one scatter-add, which reads the update once and adds it
    into the donated stack in place; XLA:CPU needs a copy of the update for each of gamma
    separate writes instead (0.55x against 0.60x ``optax.adamw``'s time for the GPT-2-124M
    lean update). An update of another dtype is added layer by layer, each layer read from
    the stack where it is written (the pattern XLA keeps in place), in the promoted dtype.

    Args:
      stack: pytree whose leaves lead with the layer axis N_L.
      updates: pytree like ``stack`` with leading axis gamma.
      ids: int32[gamma], the layer each slot of ``updates`` is added to.

    Returns:
      ``stack`` with the gamma layers updated, the others bit-for-bit unchanged.

    Examples:
      >>> import jax.numpy as jnp, omgd_jax
      >>> stack = {"w": jnp.zeros((4, 2))}
      >>> omgd_jax.add_to_layers(stack, {"w": jnp.ones((2, 2))}, jnp.array([3, 1]))["w"]
      Array([[0., 0.],
             [1., 1.],
             [0., 0.],
             [1., 1.]], dtype=float32)
    """

    def one(a, u):
        if u.dtype == a.dtype:
            return a.at[ids].add(u)
        for s in range(ids.shape[0]):
            row = jax.lax.dynamic_index_in_dim(a, ids[s], 0, False)
            a = jax.lax.dynamic_update_index_in_dim(a, (row + u[s]).astype(a.dtype), ids[s], 0)
        return a

    return jax.tree.map(one, stack, updates)


def _take(a: jax.Array, ids: jax.Array) -> jax.Array:
    return jnp.stack([jax.lax.dynamic_index_in_dim(a, ids[s], 0, False) for s in range(len(ids))])


def _layer(stack, index):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, 0, False), stack)


def _slot(ids: jax.Array, index: jax.Array) -> jax.Array:
    """Position of layer ``index`` in ``ids``, or -1 when it is not active."""
    hit = ids == index
    return jnp.where(jnp.any(hit), jnp.argmax(hit), -1).astype(jnp.int32)


def scan_layers(
    layer_fn: LayerFn,
    stack,
    x: jax.Array,
    view=None,
    ids: jax.Array | None = None,
    *,
    remat: bool = True,
) -> jax.Array:
    r"""Applies the stacked layers in order: :math:`x_{l+1} = f(W_l, x_l)`, l = 0..N_L-1.

    Without ``view`` this is ``lax.scan`` over the stack (the dense step). With ``view`` and
    ``ids`` (int32[gamma], distinct layer indices) the result has the same value, and its
    derivative is taken with respect to ``x`` and ``view`` only:

    .. math::
        \frac{\partial L}{\partial \mathrm{view}_s}
        = \frac{\partial L}{\partial W_{\mathrm{ids}_s}},
        \qquad \frac{\partial L}{\partial \mathrm{stack}} = 0,

    the backward of an inactive layer computing the input cotangent alone. ``view`` is only a
    differentiation point: the forward reads every weight from ``stack`` and never reads
    ``view``'s values (zeros of the right shape do, as :func:`lean_value_and_grad` passes).
    Inside :func:`lean_value_and_grad` a call without ``view`` finds it by itself, so a model
    calls ``scan_layers(layer_fn, stack, x)`` whichever step trains it.

    Args:
      layer_fn: ``(layer_params, x) -> x``, one layer, ``layer_params`` shaped like one slice
        of ``stack``.
      stack: pytree whose leaves lead with the layer axis N_L.
      x: the activation entering layer 0.
      view: pytree like ``stack`` with leading axis gamma: the trainable layers.
      ids: int32[gamma], the layer index of every slot of ``view``.
      remat: keep only each layer's input for the backward pass and recompute the layer there
        (least memory); ``False`` keeps each layer's linearisation residuals (no recompute).

    Returns:
      The activation leaving the last layer.

    References:
      Yang et al., Omni-Masked Gradient Descent, arXiv 2603.05960, 2026 (layer-wise OMGD).
      Pan et al., LISA: Layerwise Importance Sampling for Memory-Efficient Large Language
      Model Fine-Tuning, arXiv 2403.17919, 2024.

    Examples:
      >>> import jax, jax.numpy as jnp, omgd_jax
      >>> stack = {"w": jnp.arange(1.0, 5.0)}            # 4 scalar layers: x -> w x
      >>> f = lambda p, x: p["w"] * x
      >>> ids = jnp.array([2])
      >>> view = omgd_jax.gather_layers(stack, ids)
      >>> loss = lambda v, x: omgd_jax.scan_layers(f, stack, x, v, ids)
      >>> jax.grad(loss)(view, 1.0)["w"]                 # d(1*2*3*4)/dw_2 = 1*2*4
      Array([8.], dtype=float32)
    """
    if view is None and ids is None:
        view, ids = _trainable_view(stack)
    if view is None:
        if ids is not None:
            raise ValueError("scan_layers: ids is given without view; pass both or neither")
        body = jax.checkpoint(layer_fn) if remat else layer_fn
        return jax.lax.scan(lambda h, p: (body(p, h), None), x, stack)[0]
    if ids is None:
        raise ValueError("scan_layers: view is given without ids; pass both or neither")
    ids = jnp.asarray(ids, jnp.int32)
    if ids.ndim != 1:
        raise ValueError(
            f"scan_layers: ids must be a 1-D int array of layer indices, got {ids.shape}"
        )
    depth = {a.shape[0] for a in jax.tree.leaves(stack)}
    gamma = {a.shape[0] for a in jax.tree.leaves(view)}
    if len(depth) != 1 or gamma != {ids.shape[0]}:
        raise ValueError(
            "scan_layers: every leaf of stack must lead with the same layer axis and every leaf "
            f"of view with len(ids)={ids.shape[0]}; got {sorted(depth)} and {sorted(gamma)}"
        )
    return _lean(layer_fn, remat, stack, view, ids, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _lean(layer_fn, remat, stack, view, ids, x):
    del view, ids
    return jax.lax.scan(lambda h, p: (layer_fn(p, h), None), x, stack)[0]


def _lean_fwd(layer_fn, remat, stack, view, ids, x):
    del view
    if remat:

        def body(h, p):
            return layer_fn(p, h), h

        y, inputs = jax.lax.scan(body, x, stack)
        return y, (stack, ids, inputs)

    # Residuals that depend on neither the layer's weights nor its input (a causal mask built
    # inside the layer) are the same for every layer: kept once, not once per layer.
    p0 = _layer(stack, 0)
    shared = _invariant_residuals(layer_fn, p0, x)

    def body_res(h, p):
        y, vjp = jax.vjp(layer_fn, p, h)
        res = _residuals(vjp, p)
        return y, [None if c is not None else r for r, c in zip(res, shared, strict=True)]

    y, saved = jax.lax.scan(body_res, x, stack)
    return y, (stack, ids, (saved, shared))


def _residuals(vjp, p):
    """The arrays of a vjp closure, the layer's weights left out (the backward re-reads them)."""
    leaves = jax.tree.leaves(vjp)
    weights = {id(w) for w in jax.tree.leaves(p)}
    return [None if id(r) in weights else r for r in leaves]


def _invariant_residuals(layer_fn, p, h):
    """Per residual of one layer: its value if it depends on neither ``p`` nor ``h`` (computed
    here, once), else None. Found on the jaxpr, looking inside nested calls."""

    def residuals(p, h):
        return [r for r in _residuals(jax.vjp(layer_fn, p, h)[1], p) if r is not None]

    closed = jax.make_jaxpr(residuals)(p, h)
    free = iter([not d for d in _depends(closed.jaxpr, [True] * len(closed.jaxpr.invars))])
    _, vjp = jax.vjp(layer_fn, p, h)  # only the free residuals are used: the rest is dead code
    return [r if r is not None and next(free) else None for r in _residuals(vjp, p)]


def _call_jaxpr(eqn):
    """The jaxpr a call-like equation (jit, remat, custom_jvp...) runs on its own operands."""
    if eqn.primitive.name in ("scan", "while", "cond"):
        return None
    for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = getattr(eqn.params.get(name), "jaxpr", eqn.params.get(name))
        if j is not None and (len(j.invars), len(j.outvars)) == (
            len(eqn.invars),
            len(eqn.outvars),
        ):
            return j
    return None


def _depends(jaxpr, inputs_depend) -> list[bool]:
    """Which outputs of ``jaxpr`` depend on the inputs flagged in ``inputs_depend``."""
    dep = {v for v, d in zip(jaxpr.invars, inputs_depend, strict=True) if d}

    def depends(v):
        return not isinstance(v, jex_core.Literal) and v in dep

    for eqn in jaxpr.eqns:
        ins = [depends(v) for v in eqn.invars]
        inner = _call_jaxpr(eqn)
        if inner is not None:  # look inside the call
            outs = _depends(inner, ins)
        else:  # loops, branches and the rest: any dependent input taints every output
            outs = [any(ins)] * len(eqn.outvars)
        dep.update(v for v, d in zip(eqn.outvars, outs, strict=True) if d)
    return [depends(v) for v in jaxpr.outvars]


def _backward(stack, ids, dy, vjps):
    """The backward loop over the layers (last to first) of both modes.

    ``vjps(index, p)`` gives ``(full, input_only)`` for layer ``index``: ``full(dh) -> (dp,
    dx)``, ``input_only(dh) -> dx``. An active layer's ``dp`` goes into its slot of the
    ``[gamma, ...]`` gradient; an inactive one takes ``input_only`` (no x^T dy matmuls).
    """
    n = jax.tree.leaves(stack)[0].shape[0]
    # Zeros made from dy: a constant would be allocated before the forward pass and live
    # through it; these are made when the backward pass starts.
    zero = jnp.isnan(dy[(0,) * dy.ndim]).astype(dy.dtype) * 0
    gbuf = jax.tree.map(
        lambda a: jnp.broadcast_to(zero.astype(a.dtype), (ids.shape[0],) + a.shape[1:]), stack
    )

    def body(carry, index):
        dh, gbuf = carry
        slot = _slot(ids, index)
        # Each branch slices the layer and its residuals itself: slices made outside would be
        # operands of the cond, which XLA materialises as copies.

        def active(dh, gbuf):
            dp, dx = vjps(index, _layer(stack, index))[0](dh)
            gbuf = jax.tree.map(
                lambda b, d: jax.lax.dynamic_update_index_in_dim(b, d.astype(b.dtype), slot, 0),
                gbuf,
                dp,
            )
            return dx, gbuf

        def inactive(dh, gbuf):
            return vjps(index, _layer(stack, index))[1](dh), gbuf

        return jax.lax.cond(slot >= 0, active, inactive, dh, gbuf), None

    (dx, gbuf), _ = jax.lax.scan(body, (dy, gbuf), jnp.arange(n), reverse=True)
    return None, gbuf, None, dx


def _lean_bwd(layer_fn, remat, res, dy):
    """remat: each layer is recomputed once from its saved input.

    A two-pass variant (input cotangents for all layers first, then the weight cotangents of
    the active ones, recomputed again) was measured against this one: 0.15 GiB less at
    LLaMA-7B (19.53 against 19.68 GiB) but 7.3 MiB more on the demo's small model (37.18
    against 29.89 MiB) and 9 to 65 MiB more on GPT-2-124M, and it recomputes the active
    layers twice. Residual mode: each layer's vjp is rebuilt from its saved residuals, and the
    weight cotangent is dead code in the inactive branch, which XLA removes.
    """
    stack, ids, saved = res
    if remat:

        def vjps(index, p):
            h = jax.lax.dynamic_index_in_dim(saved, index, 0, False)
            full = lambda dh: jax.vjp(layer_fn, p, h)[1](dh)  # noqa: E731
            return full, lambda dh: jax.vjp(lambda h: layer_fn(p, h), h)[1](dh)[0]

    else:
        per_layer, shared = saved

        def vjps(index, p):
            rows = [
                c if c is not None else _row(r, index)
                for r, c in zip(per_layer, shared, strict=True)
            ]
            vjp = _rebuild(layer_fn, p, rows, dy)
            return vjp, lambda dh: vjp(dh)[1]

    return _backward(stack, ids, dy, vjps)


def _row(r, index):
    return None if r is None else jax.lax.dynamic_index_in_dim(r, index, 0, False)


def _rebuild(layer_fn, p, residuals, h_like):
    """The vjp closure of one layer from its saved residuals, the weights re-read from ``p``.

    Tracing the layer again gives the closure's structure; its forward is dead code once the
    saved residuals replace the traced ones, and XLA removes it.
    """
    _, vjp = jax.vjp(layer_fn, p, jnp.zeros(h_like.shape, h_like.dtype))
    leaves, treedef = jax.tree.flatten(vjp)
    return jax.tree.unflatten(
        treedef, [x if r is None else r for x, r in zip(leaves, residuals, strict=True)]
    )


_lean.defvjp(_lean_fwd, _lean_bwd)


# ------------------------------------------------------------------------- the step's pieces
def active_layers(opt_state) -> jax.Array:
    """The layer ids (int32[gamma]) the next ``update`` of a layer-wise OMGD state trains.

    ``opt_state`` is the state of (a chain or wrapper holding) ``omgd`` / ``omgd_adamw`` with
    ``granularity="layer", state="compact"``; the ids are traced data, so one compiled step
    serves every phase.
    """
    found = optax.tree.get_all_with_path(opt_state, "omgd_layer_ids")
    found = [f for f in found if isinstance(f[1], jax.Array | jax.ShapeDtypeStruct)]
    if len(found) != 1:
        raise ValueError(
            "active_layers: opt_state must hold exactly one layer-wise compact OMGD state "
            "(omgd(..., granularity='layer', state='compact') or omgd_adamw with the same); "
            f"found {len(found)}"
        )
    return found[0][1]


def _stacked(params, layers: layers_lib.LayerSpec):
    leaves, treedef = jax.tree.flatten(params)
    plan = layers_lib.plan_layers(params, layers)
    if layers_lib.UNROLLED in plan.roles:
        raise ValueError(
            "the lean layer-wise step needs stacked layers (a leading layer axis, as nnx.scan / "
            "nnx.vmap make them); layers= selects unrolled layers"
        )
    return leaves, treedef, plan.roles


def _depth(params, layers) -> int:
    return layers_lib.plan_layers(params, layers).num_layers


def layer_view(params, ids: jax.Array, *, layers: layers_lib.LayerSpec):
    """``params`` with every stacked leaf replaced by its ``[gamma, ...]`` active layers.

    The optimizer runs on it (``tx.update(grads, state, view, active_layers=ids, ...)``) and
    `apply_layer_updates` writes it back.
    """
    leaves, treedef, roles = _stacked(params, layers)
    out = [
        _take(x, ids) if r == layers_lib.STACKED else x for x, r in zip(leaves, roles, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def lean_value_and_grad(fun: Callable, *, layers: layers_lib.LayerSpec, has_aux: bool = False):
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

    Args:
      fun: the loss, ``fun(params, *args) -> loss`` (or ``(loss, aux)`` with ``has_aux``).
      layers: regex on the '/'-joined key path (or callable) selecting the stacked leaves, as
        for ``omgd(..., granularity="layer")``.
      has_aux: as for ``jax.value_and_grad``.

    Returns:
      ``f(params, ids, *args) -> (value, grads)``.

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

    def wrapped(params, ids, *args, **kwargs):
        leaves, treedef, roles = _stacked(params, layers)
        ids = jnp.asarray(ids, jnp.int32)
        train = [i for i, r in enumerate(roles) if r in (layers_lib.ALWAYS, layers_lib.STACKED)]
        stack = [i for i in train if roles[i] == layers_lib.STACKED]

        def loss(trainable):
            full = list(leaves)
            for i, x in zip(train, trainable, strict=True):
                if roles[i] == layers_lib.ALWAYS:
                    full[i] = x
            view = [trainable[train.index(i)] for i in stack]
            with _train_only([leaves[i] for i in stack], view, ids):
                return fun(jax.tree.unflatten(treedef, full), *args, **kwargs)

        # The views are only differentiation points: scan_layers reads the weights from the
        # stack, so these zeros are never read and XLA does not allocate them.
        point = [
            jnp.zeros((ids.shape[0],) + leaves[i].shape[1:], leaves[i].dtype)
            if roles[i] == layers_lib.STACKED
            else leaves[i]
            for i in train
        ]
        value, g = jax.value_and_grad(loss, has_aux=has_aux)(point)
        out = [jnp.zeros_like(x) for x in leaves]  # non-float leaves: nothing to train
        for i, x in zip(train, g, strict=True):
            out[i] = x
        return value, jax.tree.unflatten(treedef, out)

    return wrapped


def apply_layer_updates(params, params_view, updates, ids: jax.Array, *, layers):
    """New parameters: the always-active leaves plus their update, the active layers of every
    stack plus theirs, written in place (``params`` donated: gamma layers touched, the rest
    bit-for-bit kept), each sum taken as ``optax.apply_updates`` takes it.

    ``params_view`` is the `layer_view` the optimizer was given; its structure is checked, and
    the layers are read again from ``params`` where they are written (`add_to_layers`), which
    keeps the write in place and the view out of the write.
    """
    leaves, treedef, roles = _stacked(params, layers)
    treedef.flatten_up_to(params_view)  # the same tree as params, or a clear error
    upd = treedef.flatten_up_to(updates)
    out = []
    for x, u, r in zip(leaves, upd, roles, strict=True):
        if r == layers_lib.STACKED:
            out.append(add_to_layers(x, u, ids))
        elif r == layers_lib.ALWAYS:
            out.append(optax.apply_updates(x, u))
        else:
            out.append(x)
    return jax.tree.unflatten(treedef, out)


def _after(ids: jax.Array, tree) -> jax.Array:
    """``ids``, made to depend on the first element of every float leaf of ``tree`` (the
    ``[gamma, ...]`` gradients): what reads them is scheduled after the backward pass, so the
    gathered copy of the active layers never lives beside the backward's buffers (XLA:CPU
    drops optimization barriers before scheduling). The clamp bound is ``max(ids)`` or more,
    so the value is ``ids``.
    """
    nan = jnp.zeros((), bool)
    for leaf in jax.tree.leaves(tree):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            nan = nan | jnp.isnan(leaf[(0,) * leaf.ndim])
    return jnp.minimum(ids, jnp.max(ids) + nan.astype(ids.dtype))


def lean_train_step(loss_fn: Callable, tx: optax.GradientTransformation, *, layers, has_aux=False):
    r"""One lean layer-wise training step: ``step(params, opt_state, *args)``.

    Reads the active layers from ``opt_state`` (:func:`active_layers`), differentiates only
    them (:func:`lean_value_and_grad`), runs ``tx`` on the always-active leaves and the
    ``[gamma, ...]`` views, and writes the updated layers into ``params`` in place. ``tx`` must
    hold a layer-wise compact OMGD state (``omgd_adamw(..., granularity="layer",
    layers=layers)``, LISA); transformations chained before it (global-norm clipping) see the
    trained share only, as in PyTorch where frozen layers have no gradient.

    Jit it once with ``donate_argnums=(0, 1)``: the active ids are traced data, so every phase
    runs the same compiled program. The update is the dense compact path's, restricted to what
    it touches:

    .. math::
        \theta^{(l)} \leftarrow \theta^{(l)} + \mathrm{tx}\big(\tfrac{N_L}{\gamma}
        \nabla_{\theta^{(l)}} f\big) \ \ (l \in \mathrm{ids}), \qquad
        \theta^{(l)} \text{ unchanged } (l \notin \mathrm{ids}),

    the always-active leaves updated every step with scale 1.

    Args:
      loss_fn: ``loss_fn(params, *args) -> loss`` whose model runs the stacked layers through
        :func:`scan_layers`.
      tx: the optimizer, holding a layer-wise compact OMGD state.
      layers: regex (or callable) selecting the stacked leaves, as given to ``tx``.
      has_aux: ``loss_fn`` returns ``(loss, aux)``.

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
    grad_fn = lean_value_and_grad(loss_fn, layers=layers, has_aux=has_aux)

    def step(params, opt_state, *args, **kwargs):
        ids = active_layers(opt_state)
        value, grads = grad_fn(params, ids, *args, **kwargs)
        _, treedef, roles = _stacked(params, layers)
        stacked = [g for g, r in zip(treedef.flatten_up_to(grads), roles, strict=True)
                   if r == layers_lib.STACKED]  # fmt: skip
        view = layer_view(params, _after(ids, stacked), layers=layers)
        updates, opt_state = tx.update(
            grads, opt_state, view, active_layers=ids, num_layers=_depth(params, layers)
        )
        return apply_layer_updates(params, view, updates, ids, layers=layers), opt_state, value

    return step
