"""SIFT: AdamW on a fixed sparse subset of every weight, chosen by gradient magnitude."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from omgd_jax._src.arguments import renamed
from omgd_jax._src.blocks import check_rule
from omgd_jax._src.layers import path_str
from omgd_jax._src.placeholder import NotParams, is_params_placeholder
from omgd_jax._src.schedule import check_int

LeafSpec = str | re.Pattern | Callable[[str, Any], bool] | None

# Role of a leaf without a subset.
_DENSE = "dense"  # floating, not selected: plain AdamW.
_SKIP = "skip"  # not floating: a zero update, the parameter stays as it is.


class SiftState(NamedTuple):
    """State of :func:`sift`: sizes fixed at init (k = ceil(rate * n) per weight row)."""

    sift_count: jax.Array  # int32, optimizer steps taken; the subset is chosen at select_step.
    sift_indices: (
        Any  # per sparse leaf: int32 [rows, k], flat positions in each row; else MaskedNode.
    )
    sift_adam_state: (
        Any  # optax.scale_by_adam state over the [rows, k] values (dense leaves: full).
    )


def _matches(spec: LeafSpec, name: str, leaf) -> bool:
    if callable(spec):
        return bool(spec(name, leaf))
    return re.search(spec, name) is not None


def _layout(tree, sparse_rate: float, selected: LeafSpec, layers: LeafSpec):
    """Per leaf: (rows, row length, k) for a sparse leaf, or _DENSE / _SKIP."""
    with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for path, leaf in with_path:
        name = path_str(path)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            out.append(_SKIP)
        elif selected is not None and not _matches(selected, name, leaf):
            out.append(_DENSE)
        else:
            stacked = layers is not None and leaf.ndim >= 1 and _matches(layers, name, leaf)
            rows = leaf.shape[0] if stacked else 1
            length = math.prod(leaf.shape) // max(rows, 1)
            k = min(length, max(1, math.ceil(sparse_rate * length)))
            out.append((rows, length, k))
    if selected is not None and not any(isinstance(x, tuple) for x in out):
        names = [path_str(p) for p, _ in with_path]
        raise ValueError(f"leaves={selected!r} selects no leaf; paths look like {names[:4]}")
    return out


def _scale_by_sparse_adam(sparse_rate, select_step, selected, layers, adam, weight_decay, mask):
    def views(leaves, layout, fn_sparse, fn_dense):
        return [
            optax.MaskedNode()
            if spec == _SKIP
            else fn_dense(x)
            if spec == _DENSE
            else fn_sparse(x, spec)
            for x, spec in zip(leaves, layout, strict=True)
        ]

    def init_fn(params):
        if is_params_placeholder(params):
            return SiftState(jnp.zeros([], jnp.int32), NotParams(), NotParams())
        leaves, treedef = jax.tree.flatten(params)
        layout = _layout(params, sparse_rate, selected, layers)
        indices = [
            jnp.zeros((spec[0], spec[2]), jnp.int32)
            if isinstance(spec, tuple)
            else optax.MaskedNode()
            for spec in layout
        ]
        values = views(
            leaves,
            layout,
            lambda x, spec: jnp.zeros((spec[0], spec[2]), x.dtype),
            lambda x: jnp.zeros(x.shape, x.dtype),
        )
        unflat = lambda xs: jax.tree.unflatten(treedef, xs)
        return SiftState(jnp.zeros([], jnp.int32), unflat(indices), adam.init(unflat(values)))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        leaves, treedef = jax.tree.flatten(updates)
        layout = _layout(updates, sparse_rate, selected, layers)
        unflat = lambda xs: jax.tree.unflatten(treedef, xs)
        old_indices = treedef.flatten_up_to(state.sift_indices)
        p_leaves = None if params is None else treedef.flatten_up_to(params)
        decayed = mask(params) if callable(mask) else mask
        decayed = [True] * len(leaves) if decayed is None else treedef.flatten_up_to(decayed)
        count = state.sift_count
        selecting = count == select_step

        def step():
            indices = []
            for g, spec, old in zip(leaves, layout, old_indices, strict=True):
                if not isinstance(spec, tuple):
                    indices.append(old)
                    continue
                rows, length, k = spec
                choose = lambda g=g, rows=rows, length=length, k=k: jax.lax.top_k(
                    jnp.abs(g.reshape(rows, length)), k
                )[1].astype(jnp.int32)
                indices.append(jax.lax.cond(selecting, choose, lambda old=old: old))

            def gather(xs):
                return [
                    jnp.take_along_axis(x.reshape(spec[0], spec[1]), idx, axis=1)
                    if isinstance(spec, tuple)
                    else (optax.MaskedNode() if spec == _SKIP else x)
                    for x, spec, idx in zip(xs, layout, indices, strict=True)
                ]

            u_view, adam_state = adam.update(unflat(gather(leaves)), state.sift_adam_state)
            u_view = treedef.flatten_up_to(u_view)
            if p_leaves is not None:
                u_view = [
                    u + weight_decay * p if flag and spec != _SKIP else u
                    for u, p, flag, spec in zip(
                        u_view, gather(p_leaves), decayed, layout, strict=True
                    )
                ]
            out = []
            for g, u, spec, idx in zip(leaves, u_view, layout, indices, strict=True):
                if spec == _SKIP:
                    out.append(jnp.zeros_like(g))
                elif spec == _DENSE:
                    out.append(u.astype(g.dtype))
                else:
                    rows, length, _ = spec
                    full = jnp.zeros((rows, length), g.dtype)
                    full = full.at[jnp.arange(rows)[:, None], idx].set(u.astype(g.dtype))
                    out.append(full.reshape(g.shape))
            return out, indices, adam_state

        def wait():
            out = [jnp.zeros_like(g) for g in leaves]
            return out, old_indices, state.sift_adam_state

        if params is None and not (isinstance(weight_decay, int | float) and weight_decay == 0):
            raise ValueError("sift: weight decay needs params; pass params to update")
        if select_step == 0:
            out, indices, adam_state = step()
        else:
            out, indices, adam_state = jax.lax.cond(count >= select_step, step, wait)
        new_state = SiftState(optax.safe_increment(count), unflat(indices), adam_state)
        return unflat(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_sift(
    sparse_rate: float = 0.1,
    *,
    select_step: int = 0,
    leaves: LeafSpec = None,
    stacked: LeafSpec = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SIFT's sparse Adam, before the learning rate: :func:`sift` without its last scale.

    .. math::
        u_t[S] = \mathrm{Adam}(g_t[S]) + \lambda\,\theta_S,\qquad
        u_t[\bar S] = 0

    Args:
      sparse_rate, select_step, leaves, stacked, b1, b2, eps, weight_decay, mask: as in
        :func:`sift`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state `SiftState`; chain
      ``optax.scale_by_learning_rate`` after it.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax, omgd_jax
      >>> params = {"w": jnp.zeros(4)}
      >>> tx = optax.chain(omgd_jax.scale_by_sift(0.5), optax.scale(-1.0))
      >>> u, _ = tx.update({"w": jnp.array([0.1, -2.0, 3.0, 0.0])}, tx.init(params), params)
      >>> print(np.flatnonzero(u["w"]))
      [1 2]

    References:
      Song et al., Sparse is Enough in Fine-tuning Pre-trained Large Language Models,
      arXiv 2312.11875, 2023.
    """
    if isinstance(sparse_rate, bool) or not isinstance(sparse_rate, int | float):
        raise TypeError(f"sparse_rate must be a float in (0, 1], got {sparse_rate!r}")
    if not 0 < sparse_rate <= 1:
        raise ValueError(f"sparse_rate must be in (0, 1], got {sparse_rate}")
    check_int("select_step", select_step, 0)
    check_rule("leaves", leaves)
    check_rule("stacked", stacked)
    return _scale_by_sparse_adam(
        float(sparse_rate),
        select_step,
        leaves,
        stacked,
        optax.scale_by_adam(b1, b2, eps),
        weight_decay,
        mask,
    )


@renamed(selected="leaves", layers="stacked")
def sift(
    learning_rate: optax.ScalarOrSchedule,
    sparse_rate: float = 0.1,
    *,
    select_step: int = 0,
    leaves: LeafSpec = None,
    stacked: LeafSpec = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SIFT: AdamW on the top-:math:`|g|` entries of every weight, a subset fixed once.

    Sparse Increment Fine-Tuning (Song et al. 2023). At step :math:`t_0` = ``select_step``
    the subset :math:`S` of every selected weight (every row of a stacked weight, see
    ``layers``) is the :math:`k = \lceil \rho\, n \rceil` entries of largest gradient
    magnitude, :math:`\rho` = ``sparse_rate``; from then on only those entries are trained,
    with AdamW whose moments live in k-sized buffers:

    .. math::
        S = \operatorname{top-}k\,|g_{t_0}|,\qquad
        \theta_S \leftarrow \theta_S - \eta_t\Big(\frac{\hat m_t}{\sqrt{\hat v_t}+\epsilon}
        + \lambda\,\theta_S\Big),\qquad \theta_{\bar S}\ \text{unchanged (bit for bit)},

    with :math:`m, v \in \mathbb{R}^k` fed :math:`g_t[S]`. The state holds the indices
    (int32) and the moments only: :math:`12k` bytes per fp32 weight against AdamW's
    :math:`8n` (:math:`1.5\rho`: 0.15 of AdamW's at :math:`\rho = 0.1`). Its size is fixed
    at ``init`` from the shapes, so ``init`` works on ``jax.ShapeDtypeStruct`` and the state
    never changes shape.

    **Before and at the selection step.** Steps :math:`t < t_0` return a zero update for
    every leaf and leave the state untouched (besides the counter): nothing is trained before
    the subset exists, and a full-gradient warm-up would need a full-size state. The update
    at :math:`t = t_0` selects :math:`S` from that step's gradient and makes the first Adam
    step on it. For a selection from a larger batch wrap ``sift`` in ``optax.MultiSteps``:
    the gradient it sees is the mean over the micro-batches. Top-k ties go to the lower index.

    Leaves not picked by ``selected`` are trained densely with AdamW; non-floating leaves get
    a zero update (they stay as they are).

    Args:
      learning_rate: a float or an optax schedule.
      sparse_rate: :math:`\rho \in (0, 1]`, the share of every weight that is trained
        (0.1 - 0.2 in the papers).
      select_step: :math:`t_0`, the optimizer step (0-based) whose gradient chooses the subset.
      leaves: which leaves are trained sparsely: None (every floating leaf), a regex searched
        in the '/'-joined key path, or a callable ``(path, leaf) -> bool``.
      stacked: which sparse leaves are stacked layers (a regex or callable as ``selected``):
        their subset is chosen per index of the leading axis, k per layer, so that every layer
        keeps its share. Other leaves choose their top-k over the whole leaf.
      b1, b2, eps: Adam's.
      weight_decay: decoupled weight decay :math:`\lambda`, on the trained entries only.
      mask: which leaves are decayed (a tree of bools or a callable on the params).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax, omgd_jax
      >>> params = {"w": jnp.zeros(10)}
      >>> g = {"w": jnp.array([0.5, -3.0, 0.1, 2.0, -0.2, 0.0, 1.0, 0.3, -0.4, 0.05])}
      >>> tx = omgd_jax.sift(0.1, sparse_rate=0.2)
      >>> state = tx.init(params)
      >>> u, state = tx.update(g, state, params)
      >>> print(np.flatnonzero(u["w"]), optax.tree.get(state, "sift_indices")["w"].shape)
      [1 3] (1, 2)

    References:
      Song et al., Sparse is Enough in Fine-tuning Pre-trained Large Language Models,
      arXiv 2312.11875, 2023.
      Yang et al., Omni-Masked Gradient Descent, arXiv 2603.05960, 2026 (the baseline).
    """
    core = scale_by_sift(
        sparse_rate,
        select_step=select_step,
        leaves=leaves,
        stacked=stacked,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
        mask=mask,
    )
    return optax.chain(core, optax.scale_by_learning_rate(learning_rate))
