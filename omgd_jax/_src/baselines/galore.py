"""GaLore and GoLore: Adam in a rank-r subspace of every weight matrix's gradient.

``optax.contrib.galore`` implements GaLore; :func:`galore` returns it as it is wherever it can.
It cannot (read ``optax/contrib/_galore.py``, optax 0.2.8):

* take another projector than the SVD of the gradient (GoLore draws it at random);
* put the projector on the paper's side: it always projects the **larger** dimension of a
  matrix (``use_left = m >= n``), where GaLore's paper and released code project the smaller
  one, so its state is max(m,n)·r + 2·min(m,n)·r against the paper's min·r + 2·max·r;
* treat a stacked leaf [N_L, m, n] as N_L matrices (its dimension numbers must name every axis,
  so it would flatten the layers into one matrix).

For those cases :func:`_scale_by_projected_adam` is the smallest transformation that does the
same thing with a projector function, a side and leading batch axes: optax's own pieces do the
rest (``optax.scale_by_adam`` runs in the projected space, then ``add_decayed_weights`` and
``scale_by_learning_rate`` in the full space, chained exactly as ``optax.contrib.galore`` does).
With ``projector_side="optax"`` it reproduces ``optax.contrib.galore`` step for step (tested).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from omgd_jax._src import layers as layers_lib
from omgd_jax._src.arguments import renamed
from omgd_jax._src.blocks import check_rule
from omgd_jax._src.lapack_threads import single_threaded_lapack_on_cpu
from omgd_jax._src.layers import path_str
from omgd_jax._src.placeholder import NotParams, is_params_placeholder
from omgd_jax._src.schedule import canonical_key, check_choice, check_int, check_key

SIDES = ("paper", "optax")

MatrixSpec = str | re.Pattern | Callable[[str, Any], bool] | None


class GaloreState(NamedTuple):
    """State of :func:`galore` / :func:`golore` (the projected-space form)."""

    galore_count: jax.Array  # int32, optimizer steps taken; projectors refresh every T of them.
    galore_key: jax.Array  # typed PRNG key of GoLore's random projectors (unused by SVD).
    galore_projector: Any  # per leaf: P [..., d, r] (d the projected side), or MaskedNode.
    galore_adam_state: Any  # optax.scale_by_adam state over the projected (or full) leaves.


def stiefel_projector(
    key: jax.Array, dim: int, rank: int, batch_shape: tuple[int, ...] = (), dtype=jnp.float32
) -> jax.Array:
    r"""A matrix drawn uniformly (Haar) from the Stiefel manifold :math:`\{P : P^\top P = I_r\}`.

    With :math:`Z` a standard Gaussian ``dim x rank`` matrix and :math:`Z = QR` its thin QR
    decomposition, :math:`P = Q\,\mathrm{diag}(\mathrm{sign}(R_{ii}))` has the law of
    :math:`Z (Z^\top Z)^{-1/2}`, the uniform distribution on the manifold (the sign correction
    makes the factorisation unique; without it the law depends on the QR routine).
    In particular :math:`\mathbb{E}[P P^\top] = \tfrac{r}{d} I_d`.

    Args:
      key: a PRNG key.
      dim: d, the number of rows.
      rank: r <= d, the number of orthonormal columns.
      batch_shape: leading axes: independent draws, one per index.
      dtype: dtype of the result (the draw is made in float32).

    Returns:
      An array of shape ``batch_shape + (dim, rank)`` with orthonormal columns.

    Examples:
      >>> import jax, jax.numpy as jnp, omgd_jax
      >>> p = omgd_jax.stiefel_projector(jax.random.key(0), 5, 2)
      >>> print(p.shape, bool(jnp.allclose(p.T @ p, jnp.eye(2), atol=1e-6)))  # P^T P = I
      (5, 2) True
    """
    check_int("dim", dim, 1)
    check_int("rank", rank, 1)
    if rank > dim:
        raise ValueError(f"rank must be <= dim, got rank={rank}, dim={dim}")
    z = jax.random.normal(key, (*batch_shape, dim, rank), jnp.float32)
    q, r = jnp.linalg.qr(z)
    signs = jnp.where(jnp.diagonal(r, axis1=-2, axis2=-1) < 0, -1.0, 1.0)
    return (q * signs[..., None, :]).astype(dtype)


# ----------------------------------------------------------------------------------- layout
def _layout(tree, rank: int, side: str, matrices: MatrixSpec) -> list[tuple[bool, int] | None]:
    """Per leaf: None (plain Adam) or (project the left side, effective rank).

    A chosen leaf is a matrix over its last two axes (m, n); leading axes are a batch of
    independent matrices (stacked layers). The projected side d is the smaller of (m, n) for
    ``"paper"`` (left when m < n, as GaLore's released code) and the larger for ``"optax"``
    (left when m >= n, as ``optax.contrib.galore``); the effective rank is min(rank, m, n).
    """
    with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
    out: list[tuple[bool, int] | None] = []
    for path, leaf in with_path:
        name = path_str(path)
        if matrices is None:
            chosen = leaf.ndim == 2
        elif callable(matrices):
            chosen = bool(matrices(name, leaf))
        else:
            chosen = re.search(matrices, name) is not None
        if not chosen:
            out.append(None)
            continue
        if leaf.ndim < 2:
            raise ValueError(
                f"leaves selects {name!r} of shape {leaf.shape}: a projected leaf needs >= 2 "
                "axes (its last two are the matrix)"
            )
        m, n = leaf.shape[-2:]
        left = m < n if side == "paper" else m >= n
        out.append((left, min(rank, m, n)))
    if matrices is not None and all(x is None for x in out):
        names = [path_str(p) for p, _ in with_path]
        raise ValueError(f"leaves={matrices!r} selects no leaf; paths look like {names[:4]}")
    return out


def _shapes(leaf, spec):
    """(projector shape, projected-gradient shape) of a leaf under ``spec``."""
    *batch, m, n = leaf.shape
    left, r = spec
    if left:
        return (*batch, m, r), (*batch, r, n)
    return (*batch, n, r), (*batch, m, r)


def _t(x):
    return jnp.swapaxes(x, -1, -2)


# ------------------------------------------------------------------------------- transform
def _scale_by_projected_adam(
    rank: int,
    update_proj_gap: int,
    scale: float,
    projector_side: str,
    matrices: MatrixSpec,
    svd_steps: int | None,
    key,
    base: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """GaLore's projection around ``base`` (``optax.scale_by_adam``).

    ``svd_steps=None``: every projector is the gradient's SVD (GaLore). Otherwise projectors
    refreshed at steps < ``svd_steps`` come from the SVD, later ones from
    :func:`stiefel_projector` (GoLore).
    """

    def init_fn(params):
        if is_params_placeholder(params):
            return GaloreState(
                jnp.zeros([], jnp.int32), canonical_key(key), NotParams(), NotParams()
            )
        leaves, treedef = jax.tree.flatten(params)
        layout = _layout(params, rank, projector_side, matrices)
        projector, proxy = [], []
        for x, spec in zip(leaves, layout, strict=True):
            if spec is None:
                projector.append(optax.MaskedNode())
                proxy.append(jnp.zeros(x.shape, x.dtype))
            else:
                p_shape, r_shape = _shapes(x, spec)
                projector.append(jnp.zeros(p_shape, x.dtype))
                proxy.append(jnp.zeros(r_shape, x.dtype))
        unflat = lambda xs: jax.tree.unflatten(treedef, xs)
        return GaloreState(
            jnp.zeros([], jnp.int32),
            canonical_key(key),
            unflat(projector),
            base.init(unflat(proxy)),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        # The SVD (GaLore) and QR (GoLore) run in XLA:CPU's LAPACK: one BLAS thread there, as
        # for MoFaSGD (see omgd_jax/_src/lapack_threads.py).
        single_threaded_lapack_on_cpu()
        leaves, treedef = jax.tree.flatten(updates)
        layout = _layout(updates, rank, projector_side, matrices)
        projectors = treedef.flatten_up_to(state.galore_projector)
        count = state.galore_count
        refresh = count % update_proj_gap == 0
        step_key = jax.random.fold_in(state.galore_key, count)

        def new_projector(i, g, old, spec):
            left, r = spec

            def svd_one(m):
                u, _, vh = jnp.linalg.svd(m.astype(jnp.float32), full_matrices=False)
                basis = u if left else _t(vh)
                return basis[..., :r].astype(old.dtype)

            def svd():
                if g.ndim == 2:
                    return svd_one(g)
                # One matrix at a time: a batched SVD widens the whole stack to float32 and
                # holds every layer's factors at once.
                flat = g.reshape((-1,) + g.shape[-2:])
                return jax.lax.map(svd_one, flat).reshape(old.shape)

            def random():
                d = old.shape[-2]
                sub = jax.random.fold_in(step_key, i)
                return stiefel_projector(sub, d, r, old.shape[:-2], old.dtype)

            if svd_steps is None:
                fresh = svd
            elif svd_steps == 0:
                fresh = random
            else:
                fresh = lambda: jax.lax.cond(count < svd_steps, svd, random)
            return jax.lax.cond(refresh, fresh, lambda: old)

        new_projectors, low_rank = [], []
        for i, (g, old, spec) in enumerate(zip(leaves, projectors, layout, strict=True)):
            if spec is None:
                new_projectors.append(old)
                low_rank.append(g)
                continue
            p = new_projector(i, g, old, spec)
            new_projectors.append(p)
            low_rank.append(_t(p) @ g if spec[0] else g @ p)
        unflat = lambda xs: jax.tree.unflatten(treedef, xs)
        low_rank_updates, adam_state = base.update(unflat(low_rank), state.galore_adam_state)
        out = []
        for g, u, p, spec in zip(
            leaves, treedef.flatten_up_to(low_rank_updates), new_projectors, layout, strict=True
        ):
            if spec is None:
                out.append(u)
            else:
                full = p @ u if spec[0] else u @ _t(p)
                out.append((scale * full).astype(g.dtype))
        new_state = GaloreState(
            optax.safe_increment(count), state.galore_key, unflat(new_projectors), adam_state
        )
        return unflat(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check(rank, update_proj_gap, projector_side, matrices, key):
    check_int("rank", rank, 1)
    check_int("update_proj_gap", update_proj_gap, 1)
    check_choice("projector_side", projector_side, SIDES)
    check_rule("leaves", matrices)
    check_key(key)


def _chain(core, weight_decay, mask, learning_rate):
    """Weight decay and learning rate in the full space, after the projection (as optax)."""
    return optax.chain(
        layers_lib.with_bare_masked_nodes(core),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def scale_by_galore(
    rank: int = 128,
    *,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    projector_side: str = "paper",
    leaves: MatrixSpec = None,
    svd_steps: int | None = None,
    key: jax.Array | int = 0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam in a rank-r gradient subspace, before weight decay and the learning rate.

    For every projected matrix :math:`G \in \mathbb{R}^{m \times n}` with projector
    :math:`P` (refreshed every ``update_proj_gap`` steps):

    .. math::
        R_t = P^\top G_t,\qquad \hat R_t = \mathrm{Adam}(R_t),\qquad
        u_t = \alpha\, P \hat R_t

    (the transposed form on the other side), Adam's moments living in the ``r``-dimensional
    space; other leaves get plain Adam. :func:`galore` and :func:`golore` are this, then
    ``add_decayed_weights`` and the learning rate.

    Args:
      rank: r, the subspace dimension.
      update_proj_gap: steps between projector refreshes.
      scale: :math:`\alpha`.
      projector_side: ``"paper"`` (the smaller dimension) or ``"optax"``.
      leaves: which leaves are projected, as for :func:`galore`.
      svd_steps: None: every projector is the gradient's SVD (GaLore); an int: refreshes
        before that step use the SVD, later ones a uniformly random Stiefel point (GoLore).
      key: PRNG key or int seed of the random projectors.
      b1, b2, eps: Adam's.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state holds a `GaloreState`.

    Examples:
      >>> import jax.numpy as jnp, optax, omgd_jax
      >>> params = {"w": jnp.ones((6, 3))}
      >>> tx = optax.chain(omgd_jax.scale_by_galore(rank=2), optax.scale(-1e-2))
      >>> state = tx.init(params)
      >>> u, state = tx.update(params, state, params)
      >>> print(u["w"].shape, optax.tree.get(state, "galore_projector")["w"].shape)
      (6, 3) (3, 2)

    References:
      Zhao et al., GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection,
      arXiv 2403.03507, 2024. He et al., GoLore, arXiv 2410.11289, 2024.
    """
    _check(rank, update_proj_gap, projector_side, leaves, key)
    if svd_steps is not None:
        check_int("svd_steps", svd_steps, 0)
    core = _scale_by_projected_adam(
        rank,
        update_proj_gap,
        scale,
        projector_side,
        leaves,
        svd_steps,
        key,
        optax.scale_by_adam(b1, b2, eps),
    )
    return optax.with_extra_args_support(layers_lib.with_bare_masked_nodes(core))


@renamed(matrices="leaves")
def galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    *,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    projector_side: Literal["paper", "optax"] = "paper",
    leaves: MatrixSpec = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""GaLore: Adam on the gradient projected onto its top-r singular subspace.

    For a weight matrix with gradient :math:`G_t \in \mathbb{R}^{m\times n}`, every
    T = ``update_proj_gap`` steps the projector :math:`P` (``d x r``, orthonormal columns) is
    refreshed from the SVD :math:`G_t = U \Sigma V^\top` (:math:`P = U_{:,:r}` on the left,
    :math:`V_{:,:r}` on the right); Adam runs on the projected gradient :math:`R_t` and its
    output is projected back and scaled by :math:`\alpha` = ``scale``:

    .. math::
        R_t = P^\top G_t,\quad \Delta_t = \alpha\, P\, \mathrm{Adam}(R_t)
        \qquad\text{(left; right: } R_t = G_t P,\ \Delta_t = \alpha\,\mathrm{Adam}(R_t) P^\top),

    then decoupled weight decay and the learning rate in the full space. Leaves that are not
    projected get plain Adam. Adam's moments are kept across projector refreshes (as in the
    paper and in optax).

    **Which side** (``projector_side``):

    * ``"paper"`` (default): the smaller dimension is projected, as in the paper and its
      released code (left iff m < n): state :math:`\min(m,n)\,r + 2\max(m,n)\,r` per matrix,
      the paper's :math:`mr + 2nr` for :math:`m \le n`. Every memory figure of this project
      uses this side unless it says otherwise.
    * ``"optax"``: the larger dimension is projected, as ``optax.contrib.galore`` does (left
      iff m >= n): state :math:`\max(m,n)\,r + 2\min(m,n)\,r`. With ``matrices=None`` this
      returns ``optax.contrib.galore`` itself (its ``GaLoreState``).

    The SVD projector keeps the same rank-r part of :math:`G_t` on either side; what differs
    is which dimension Adam's moments keep at full length.

    Args:
      learning_rate: a float or an optax schedule.
      rank: r; each matrix uses min(r, m, n).
      update_proj_gap: T, steps between projector refreshes (the first step refreshes).
      scale: :math:`\alpha` (0.25 in the paper's pre-training runs; optax defaults to 1).
      projector_side: ``"paper"`` or ``"optax"``, see above.
      leaves: which leaves are projected. None: every 2-D leaf (as optax). Otherwise a regex
        searched in the '/'-joined key path, or a callable ``(path, leaf) -> bool``; a chosen
        leaf with more than two axes is a stack of matrices over its last two axes, one
        projector per leading index (stacked transformer layers ``[N_L, m, n]``).
      b1, b2, eps: Adam's, in the projected space (``optax.scale_by_adam``).
      weight_decay: decoupled weight decay, applied in the full space.
      mask: which leaves are decayed (a tree of bools or a callable on the params).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, optax, omgd_jax
      >>> params = {"w": jnp.zeros((4, 8)), "b": jnp.zeros(8)}
      >>> state = omgd_jax.galore(1e-2, rank=2).init(params)  # paper: project m = 4
      >>> print(optax.tree.get(state, "galore_projector")["w"].shape,
      ...       optax.tree.get(state, "mu")["w"].shape)
      (4, 2) (2, 8)
      >>> state = omgd_jax.galore(1e-2, rank=2, projector_side="optax").init(params)
      >>> print(optax.tree.get(state, "projector")["w"].shape,  # optax.contrib.galore's state
      ...       optax.tree.get(state, "mu")["w"].shape)
      (8, 2) (4, 2)

    References:
      Zhao et al., GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection,
      arXiv 2403.03507, 2024.
    """
    matrices = leaves
    _check(rank, update_proj_gap, projector_side, matrices, 0)
    adam = optax.scale_by_adam(b1, b2, eps)
    if projector_side == "optax" and matrices is None:
        return optax.with_extra_args_support(
            optax.contrib.galore(
                learning_rate,
                rank=rank,
                update_proj_gap=update_proj_gap,
                scale=scale,
                base_optimizer=adam,
                weight_decay=weight_decay,
                mask=mask,
            )
        )
    core = _scale_by_projected_adam(
        rank, update_proj_gap, scale, projector_side, matrices, None, 0, adam
    )
    return _chain(core, weight_decay, mask, learning_rate)


@renamed(matrices="leaves")
def golore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    *,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    svd_steps: int = 0,
    key: jax.Array | int = 0,
    projector_side: Literal["paper", "optax"] = "paper",
    leaves: MatrixSpec = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""GoLore: GaLore with projectors drawn uniformly from the Stiefel manifold.

    As :func:`galore`, but a refresh at step t draws :math:`P` uniformly (Haar) from
    :math:`\{P \in \mathbb{R}^{d\times r} : P^\top P = I_r\}`, independently of the gradient
    (:func:`stiefel_projector`: :math:`P = Z (Z^\top Z)^{-1/2}` in law, :math:`Z` Gaussian):

    .. math::
        \mathbb{E}[P P^\top] = \tfrac{r}{d} I_d,\qquad
        R_t = P^\top G_t,\quad \Delta_t = \alpha\, P\, \mathrm{Adam}(R_t).

    The gradient-independent projector is what makes GoLore converge with stochastic
    gradients where GaLore's SVD projector can stall. Refreshes at steps < ``svd_steps`` use
    the SVD instead (the released scripts use SVD for the first 80 % of training:
    ``svd_steps=int(0.8 * total_steps)``); the default 0 is random from the start.

    This is not ``optax.contrib.galore``: optax computes the SVD inside its update and takes no
    other projector, so the projection is re-done here around ``optax.scale_by_adam`` (see the
    module docstring). The random draws come from ``fold_in(key, step)``, so the state only
    adds the key.

    Args:
      learning_rate, rank, update_proj_gap, scale, projector_side: as in :func:`galore`
        (``projector_side="paper"`` by default: the random projector then keeps
        :math:`r/\min(m,n)` of the gradient in expectation).
      matrices, b1, b2, eps, weight_decay, mask: as in :func:`galore`.
      svd_steps: refreshes before this step use the SVD (GaLore), later ones are random.
      key: PRNG key or int seed of the projectors.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, optax, omgd_jax
      >>> params = {"w": jnp.ones((6, 3))}
      >>> tx = omgd_jax.golore(1e-2, rank=2, key=0)
      >>> state = tx.init(params)
      >>> _, state = tx.update(params, state, params)
      >>> p = optax.tree.get(state, "galore_projector")["w"]  # right side: n = 3
      >>> print(p.shape, bool(jnp.allclose(p.T @ p, jnp.eye(2), atol=1e-6)))
      (3, 2) True

    References:
      He et al., Subspace Optimization for Large Language Models with Convergence Guarantees
      (GoLore), arXiv 2410.11289, 2024.
      Zhao et al., GaLore, arXiv 2403.03507, 2024.
      Yang et al., Omni-Masked Gradient Descent, arXiv 2603.05960, 2026 (the baseline).
    """
    matrices = leaves
    _check(rank, update_proj_gap, projector_side, matrices, key)
    check_int("svd_steps", svd_steps, 0)
    core = _scale_by_projected_adam(
        rank,
        update_proj_gap,
        scale,
        projector_side,
        matrices,
        svd_steps,
        key,
        optax.scale_by_adam(b1, b2, eps),
    )
    return _chain(core, weight_decay, mask, learning_rate)
