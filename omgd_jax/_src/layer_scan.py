"""`scan_layers`: a stack of layers under a custom backward pass that differentiates only the
active layers.

Its weight cotangent is the ``[gamma, ...]`` ``view`` of the active layers ``ids``; the backward
of an inactive layer computes only the cotangent of its input, so it skips the x^T dy matmuls,
and no ``[N_L, ...]`` gradient is ever built. `lean.py` builds the steps on it and
registers, while it traces a loss, the stacked leaves whose view a call finds by itself.

What each layer keeps for the backward pass:

* ``remat=True``: only its input (N_L x the activation entering a layer). The backward
  recomputes every layer once: the inactive ones in loops that give their input cotangent
  alone (no weight-gradient matmuls), each active one outside the loops, its weight
  cotangent too (see `_backward`). Least memory.
* ``remat=False``: the residuals of its linearisation (what ``jax.vjp`` keeps, weights not
  copied), as an ordinary backward pass would; residuals that depend on neither the weights
  nor the input (a causal mask built in the layer) are kept once for all layers. No
  recomputation; inactive layers still skip the weight-gradient matmuls (XLA removes them as
  dead code of the input cotangent's vjp).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.extend import core as jex_core

from omgd_jax._src import ordering

LayerFn = Callable[[Any, jax.Array], jax.Array]
# The name scope of the lean backward's loops over inactive layers (their trip counts are
# traced: `benchmarks/flops.py` finds them by it).
INPUT_ONLY_SCOPE = "omgd_input_cotangents"

# Set by `lean_value_and_grad` while it traces the loss: the stacked leaves it registered, so
# that a model calling `scan_layers(layer_fn, stack, x)` trains only the active layers without
# being handed the view explicitly. Keyed by identity: the tracers of this one trace.
_TRAINABLE: contextvars.ContextVar[Registry | None] = contextvars.ContextVar(
    "omgd_lean", default=None
)


class Registry:
    """The stacked leaves of one `lean_value_and_grad` trace, their views, and which of them a
    `scan_layers` call has consumed (every one must be, or their layers would not train)."""

    def __init__(self, stack_leaves, view_leaves, ids, paths):
        self.table = {
            id(a): (v, path) for a, v, path in zip(stack_leaves, view_leaves, paths, strict=True)
        }
        self.ids = ids
        self.paths = list(paths)
        self.found: set[str] = set()

    def view_of(self, stack):
        leaves, treedef = jax.tree.flatten(stack)
        hits = [id(a) in self.table for a in leaves]
        if not leaves or not any(hits):
            return None, None
        if not all(hits):
            missing = sum(not h for h in hits)
            raise ValueError(
                "scan_layers: the stack mixes leaves of params' stacked layers with "
                f"{missing} other array(s) (a cast or computed copy); pass the stacked leaves "
                "of params themselves and cast or transform inside layer_fn"
            )
        found = [self.table[id(a)] for a in leaves]
        self.found.update(path for _, path in found)
        return jax.tree.unflatten(treedef, [v for v, _ in found]), self.ids

    def check_all_found(self):
        missing = [path for path in self.paths if path not in self.found]
        if missing:
            raise ValueError(
                "lean_value_and_grad: the loss never ran the stacked leaves "
                f"{leaf_names(missing)} through omgd_jax.scan_layers, so their layers would get "
                "no gradient. Either the model does not call scan_layers(layer_fn, stack, x), "
                "or it changed the stack first (a cast to another dtype, a scale, a sharding "
                "constraint, jax.checkpoint around the whole loss): scan_layers must receive "
                "the stacked leaves of params themselves; do such work inside layer_fn, which "
                "sees one layer at a time"
            )


def leaf_names(paths, limit: int = 4) -> str:
    shown = ", ".join(repr(p) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


@contextlib.contextmanager
def train_only(registry: Registry):
    token = _TRAINABLE.set(registry)
    try:
        yield registry
    finally:
        _TRAINABLE.reset(token)


def _trainable_view(stack):
    """(view, ids) registered for ``stack`` by an enclosing `lean_value_and_grad`, or Nones."""
    registry = _TRAINABLE.get()
    return (None, None) if registry is None else registry.view_of(stack)


def gather_layers(stack, ids: jax.Array):
    """The ``[gamma, ...]`` view of layers ``ids`` of every leaf of ``stack``."""
    return jax.tree.map(lambda a: take(a, ids), stack)


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
    separate writes instead (slower: `benchmarks/update_cost.py`). An update of another dtype
    is added layer by layer, each layer read from the stack where it is written (the pattern
    XLA keeps in place), in the promoted dtype.

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


def take(a: jax.Array, ids: jax.Array) -> jax.Array:
    return jnp.stack([jax.lax.dynamic_index_in_dim(a, ids[s], 0, False) for s in range(len(ids))])


def _layer(stack, index):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, 0, False), stack)


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

    ``layer_fn`` may close over arrays computed outside it (rotary tables, a packing mask), but
    not over arrays that depend on the parameters being differentiated (JAX then raises an
    ``UnexpectedTracerError``): carry those in ``x`` or compute them inside ``layer_fn``.

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
    # symbolic_zeros=True: every leaf comes as a CustomVJPPrimal(value, perturbed). Whether the
    # view and the input are differentiated (perturbed) is static: it decides, at trace time,
    # which cotangents the backward computes (see `_backward`). Kept in the residuals' tree
    # structure (None or ()), which carries no array.
    flags = (() if _perturbed(view) else None, () if _perturbed(x) else None)
    stack, ids, x = (jax.tree.map(lambda a: a.value, t) for t in (stack, ids, x))
    if remat:

        def body(h, p):
            return layer_fn(p, h), h

        y, inputs = jax.lax.scan(body, x, stack)
        return y, (stack, ids, inputs, flags)

    # Residuals that depend on neither the layer's weights nor its input (a causal mask built
    # inside the layer) are the same for every layer: kept once, not once per layer.
    p0 = _layer(stack, 0)
    shared = _invariant_residuals(layer_fn, p0, x)

    def body_res(h, p):
        y, vjp = jax.vjp(layer_fn, p, h)
        res = _residuals(vjp, p)
        return y, [None if c is not None else r for r, c in zip(res, shared, strict=True)]

    y, saved = jax.lax.scan(body_res, x, stack)
    return y, (stack, ids, (saved, shared), flags)


def _perturbed(tree) -> bool:
    return any(leaf.perturbed for leaf in jax.tree.leaves(tree))


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


def _backward(stack, ids, dy, vjps, flags=((), ())):
    """The backward pass over the layers (last to first) of both modes.

    ``vjps(index, p)`` gives ``(full, input_only)`` for layer ``index``: ``full(dh) -> (dp,
    dx)``, ``input_only(dh) -> dx``. The active layers are visited from the highest id down
    (gamma is static, the ids traced): a loop gives the input cotangents alone (no x^T dy
    matmuls) of the inactive layers above an active one, then that layer's ``full`` runs
    outside any loop, so its weight cotangent is a buffer of its own, made when the layer's
    backward runs. The ``[gamma, ...]`` gradient is assembled from those buffers once the
    last layer's backward is done, when the remat inputs are dead. The program holds gamma
    copies of a layer's full backward and gamma + 1 loops, so its compile time grows with gamma.

    Why not one loop writing each active layer into its slot of a ``[gamma, ...]`` carry, as
    an ordinary scan's transpose does: the carry exists, whole, from the first layer's
    backward on, and each active layer's weight cotangent is made apart and then copied into
    it, so the peak held every slot and one more layer's weight cotangent.

    ``flags`` (static): whether the view (the weights) and the input ``x`` of the stack are
    differentiated. Without an input cotangent to give, the layers below the lowest active
    one do no work at all (no recompute, no vjp). Without a weight cotangent (a phase that
    trains an extra unit upstream of the stack, the embedding) every layer gives its input
    cotangent alone; with neither (the head's phase) there is no backward loop.
    """
    need_view, need_x = (f is not None for f in flags)
    if isinstance(dy, SymbolicZero) or not (need_view or need_x):
        return None, None, None, None
    n = jax.tree.leaves(stack)[0].shape[0]

    def input_only(index, dh):
        return vjps(index, _layer(stack, index))[1](dh)

    if not need_view:  # every layer: its input cotangent alone
        dx, _ = jax.lax.scan(
            lambda dh, i: (input_only(i, dh), None), dy, jnp.arange(n), reverse=True
        )
        return None, None, None, dx

    def down(dh, hi, lo):
        """Input cotangents alone through layers hi - 1, ..., lo (none when hi <= lo)."""
        with jax.named_scope(INPUT_ONLY_SCOPE):  # names the loops in jaxprs and profiles
            return jax.lax.fori_loop(0, hi - lo, lambda i, dh: input_only(hi - 1 - i, dh), dh)

    gamma = ids.shape[0]
    slots = jnp.argsort(ids)[::-1]  # the slots, highest layer first
    dh, hi, grads = dy, jnp.int32(n), []
    for k in range(gamma):
        layer = ids[slots[k]]
        dh = down(dh, hi, layer + 1)
        # Sliced with an index made from the cotangent (`ordering.ids_after`): outside a loop,
        # XLA would otherwise recompute the layer as soon as the forward saved its input and
        # keep the activations through the backward of every layer above it.
        at = ordering.ids_after(layer, dh)
        dp, dh = vjps(at, _layer(stack, at))[0](dh)
        grads.append(dp)
        hi = layer
    if need_x:
        dh = down(dh, hi, 0)
    # The gradient and its buffer are made from the last cotangent, so they exist once every
    # layer's backward is done. The gradient too: with one slot XLA drops the buffer and hands
    # the layer's own gradient on, which the update could then write into the stack while the
    # loop below still reads it, so XLA would copy the whole stack.
    grads = ordering.after(grads, dh)
    gbuf = jax.tree.map(lambda a: ordering.zeros_after(dh, (gamma,) + a.shape[1:], a.dtype), stack)
    for k in range(gamma):
        gbuf = jax.tree.map(
            lambda b, d, k=k: jax.lax.dynamic_update_index_in_dim(
                b, d.astype(b.dtype), slots[k], 0
            ),
            gbuf,
            grads[k],
        )
    return None, gbuf, None, dh if need_x else None


def _lean_bwd(layer_fn, remat, res, dy):
    """remat: each layer is recomputed once from its saved input.

    A two-pass variant (input cotangents for all layers first, then the weight cotangents of
    the active ones, recomputed again) was measured against this one (CHANGELOG): a little
    less memory at LLaMA-7B, more on the small models, and it recomputes the active layers
    twice. Residual mode: each layer's vjp is rebuilt from its saved residuals, and the
    weight cotangent is dead code in the inactive branch, which XLA removes.
    """
    stack, ids, saved, flags = res
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

    return _backward(stack, ids, dy, vjps, flags)


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


_lean.defvjp(_lean_fwd, _lean_bwd, symbolic_zeros=True)
