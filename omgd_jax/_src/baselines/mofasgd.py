"""MoFaSGD (arXiv 2507.08091): SGD with a rank-r factorisation of the momentum of every matrix.

`scale_by_mofasgd` keeps, for every 2-D leaf (and every layer of a stacked ``[N_L, m, n]`` leaf,
vmapped), the momentum as :math:`U \\operatorname{diag}(S) V^\\top` of rank r and returns the
low-rank direction; `mofasgd` composes it with the learning rate and sends every other leaf
(embeddings, head, biases, norms) to AdamW through `optax.partition`.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from omgd_jax._src import blocks
from omgd_jax._src import layers as layers_lib
from omgd_jax._src.arguments import renamed
from omgd_jax._src.lapack_threads import single_threaded_lapack_on_cpu
from omgd_jax._src.placeholder import NotParams, is_params_placeholder
from omgd_jax._src.schedule import canonical_key, check_choice, check_int, check_key

UPDATES = ("orthogonal", "inverse_sv")
INITS = ("weight_svd", "grad_svd", "random")
# Arguments of `mofasgd` and `scale_by_mofasgd` that shape the computation:
LOW_RANK, ADAMW = "mofasgd", "adamw"  # labels of the two partitions of `mofasgd`


class ScaleByMofasgdState(NamedTuple):
    """State of `scale_by_mofasgd`; per leaf, M = U diag(S) V^T (stacked: one per layer)."""

    mofasgd_count: jax.Array  # int32, steps taken (grad_svd initialises at step 0).
    mofasgd_u: (
        Any  # tuple per leaf: float32 (m, r) or (N_L, m, r) left factors; None: not a matrix.
    )
    mofasgd_s: Any  # tuple per leaf: float32 (r,) or (N_L, r) singular values, descending.
    mofasgd_v: Any  # tuple per leaf: float32 (n, r) or (N_L, n, r) right factors.


def _matrix_shape(leaf) -> tuple[int, ...] | None:
    """(m, n) of a matrix leaf, (N_L, m, n) of a stacked one, None for anything else."""
    if not hasattr(leaf, "ndim") or not jnp.issubdtype(leaf.dtype, jnp.floating):
        return None
    return tuple(leaf.shape) if leaf.ndim in (2, 3) else None


def effective_rank(rank: int, m: int, n: int) -> int:
    """The rank kept for an m x n matrix: min(rank, m, n)."""
    return min(rank, m, n)


def state_bytes_per_matrix(rank: int, m: int, n: int, itemsize: int = 4) -> int:
    """r(m + n) + r floats: the size of U, V and S for one m x n matrix."""
    r = effective_rank(rank, m, n)
    return (r * (m + n) + r) * itemsize


def _truncated_svd(a, r):
    u, s, vt = jnp.linalg.svd(a, full_matrices=False)
    return u[:, :r], s[:r], vt[:r].T


def factored_momentum_step(u, s, v, g, beta):
    r"""One momentum step on the factors: the rank-r truncation of :math:`\beta USV^\top + P_T(G)`.

    With :math:`[U | GV] = Q_U R_U`, :math:`[V | G^\top U] = Q_V R_V` (thin QR) and
    :math:`B = \begin{bmatrix}\beta\,\mathrm{diag}(S) - U^\top G V & I\\ I & 0\end{bmatrix}`,
    :math:`Q_U R_U B R_V^\top Q_V^\top = \beta USV^\top + UU^\top G + GVV^\top - UU^\top GVV^\top`,
    so the SVD of the small :math:`R_U B R_V^\top` gives the new factors.
    """
    r = s.shape[0]
    gv, gtu = g @ v, g.T @ u
    q_u, r_u = jnp.linalg.qr(jnp.concatenate([u, gv], axis=1))
    q_v, r_v = jnp.linalg.qr(jnp.concatenate([v, gtu], axis=1))
    # R_U B R_V^T by blocks, (R_U1 C + R_U2) R_V1^T + R_U1 R_V2^T with C = beta diag(S) - U^T G V:
    # no constant blocks (I, 0) concatenated, which vmap over a sharded layer axis cannot place.
    ru1, ru2, rv1, rv2 = r_u[:, :r], r_u[:, r:], r_v[:, :r], r_v[:, r:]
    left = beta * ru1 * s - ru1 @ (u.T @ gv) + ru2
    small_u, small_s, small_v = _truncated_svd(left @ rv1.T + ru1 @ rv2.T, r)
    return q_u @ small_u, small_s, q_v @ small_v


def _direction(u, s, v, update, max_value, eps):
    """U diag(w) V^T, w = 1 (orthogonal) or min(1/S, max_value) (inverse_sv), 0 where S <= eps."""
    live = s > eps
    if update == "orthogonal":
        w = live.astype(s.dtype)
    else:
        w = jnp.where(live, jnp.minimum(1.0 / jnp.where(live, s, 1.0), max_value), 0.0)
    return (u * w) @ v.T


def _explicit_layer_split(x):
    """(mesh, axes) when the layer axis of the stacked ``x`` is split over `Explicit` mesh axes
    (visible in its type, under jit too), else None."""
    try:
        sharding = jax.typeof(x).sharding
    except Exception:  # noqa: BLE001 - not a jax value
        return None
    mesh, spec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None)
    if mesh is None or not spec or spec[0] is None:
        return None
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    if any(types[a] != jax.sharding.AxisType.Explicit for a in axes):
        return None
    return mesh, spec[0]


def _over_layers(fn, stacked, batched: bool | None = None, like=None):
    """``fn`` on one matrix, or on every layer of a stacked leaf (shaped like ``like``).

    On CPU layer by layer (``lax.map``), elsewhere batched (``vmap``). jaxlib 0.10's CPU LAPACK
    kernels (QR, SVD) split a batch over XLA:CPU's intra-op pool and block a pool thread until
    it is done, so as many batched calls at once as the pool has threads (2 on 2 cores)
    deadlock: gdb shows every pool thread in ``jax::ParallelBatchMap`` waiting, at 0% CPU,
    even with the calls chained by ``optimization_barrier`` (it does not keep them apart).
    A call on one matrix runs inline and never waits on the pool, whatever else runs. The BLAS
    threads under those calls: see omgd_jax/_src/lapack_threads.py.

    ``lax.map`` cannot walk a layer axis split over `Explicit` mesh axes; then every device maps
    over its own layers (``shard_map``), so the results are split along the layer axis like
    ``like`` (the other axes gathered: a factorisation needs whole matrices). ``vmap`` keeps
    the layer axis' sharding by itself.
    """
    if not stacked:
        return fn
    if batched is None:
        batched = jax.default_backend() != "cpu"
    if batched:
        return jax.vmap(fn)

    def per_layer(*args):
        return jax.lax.map(lambda a: fn(*a), args)

    split = None if like is None else _explicit_layer_split(like)
    if split is None:
        return per_layer
    mesh, axes = split
    spec = jax.sharding.PartitionSpec(axes)
    sharded = jax.shard_map(per_layer, mesh=mesh, in_specs=spec, out_specs=spec)
    place = jax.sharding.NamedSharding(mesh, spec)
    return lambda *args: sharded(*(jax.sharding.reshard(a, place) for a in args))


def scale_by_mofasgd(
    rank: int,
    beta: float = 0.95,
    *,
    update: Literal["orthogonal", "inverse_sv"] = "orthogonal",
    max_value: float = 5.0,
    eps: float = 1e-10,
    init: Literal["weight_svd", "grad_svd", "random"] = "weight_svd",
    key: jax.Array | int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""The MoFaSGD direction of every matrix leaf, from a rank-r factored momentum.

    Every 2-D leaf (and every layer of a 3-D leaf, read as a stack ``[N_L, m, n]``) keeps its
    momentum as :math:`M = U \operatorname{diag}(S) V^\top`, :math:`r = \min(\text{rank}, m, n)`.
    Each step, with gradient G,

    .. math::
        U S V^\top \leftarrow \operatorname{SVD}_r\!\left(\beta\, U S V^\top + P_T(G)\right),
        \qquad P_T(G) = UU^\top G + G VV^\top - UU^\top G VV^\top,

    computed with two thin QRs and one :math:`2r \times 2r` SVD
    (:func:`factored_momentum_step`), and the output is :math:`U V^\top` (``"orthogonal"``, the
    paper) or :math:`U \operatorname{diag}(\min(1/S, \text{max\_value})) V^\top`
    (``"inverse_sv"``, the released configs); directions with :math:`S \le` eps are dropped.
    At full rank the momentum is exactly the dense :math:`\beta M + G`. State: r(m + n) + r
    floats per matrix. Leaves that are not matrices (``optax.MaskedNode`` under
    ``optax.partition`` included) pass through only if they are not arrays; use
    :func:`mofasgd` to send them to AdamW. On CPU, tracing ``init`` or ``update`` sets SciPy's
    BLAS (under XLA's LAPACK calls) to one thread for the process: see
    omgd_jax/_src/lapack_threads.py.

    Args:
      rank: r, the rank of the momentum (clipped to min(m, n) per matrix).
      beta: momentum decay.
      update: ``"orthogonal"`` (:math:`UV^\top`) or ``"inverse_sv"``.
      max_value: the cap on 1/S of ``"inverse_sv"``.
      eps: singular values at or below it count as zero.
      init: the factors at step 0: ``"weight_svd"`` (U, S, V of the weight's rank-r SVD, as the
        released code), ``"grad_svd"`` (the first step's momentum is the rank-r SVD of the first
        gradient) or ``"random"`` (random orthonormal U, V from ``key``, S = 0).
      key: PRNG key or int seed for ``init="random"``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (a direction: chain a learning rate after).

    Examples:
      >>> import jax.numpy as jnp, optax, omgd_jax
      >>> tx = omgd_jax.scale_by_mofasgd(rank=1, init="grad_svd")
      >>> params = {"w": jnp.zeros((3, 2))}
      >>> state = tx.init(params)
      >>> g = {"w": jnp.array([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])}
      >>> u, state = tx.update(g, state, params)
      >>> print(u["w"], state.mofasgd_s[0])  # U V^T of the top singular pair; S = 3
      [[1. 0.]
       [0. 0.]
       [0. 0.]] [3.]

    References:
      Mahdavinia and Mahdavi, Low-rank Momentum Factorization for Memory Efficient Training
      (MoFaSGD), arXiv 2507.08091, 2025.
    """
    check_int("rank", rank, 1)
    check_choice("update", update, UPDATES)
    check_choice("init", init, INITS)
    check_key(key)
    for name, value in (("beta", beta), ("max_value", max_value), ("eps", eps)):
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")

    def shapes(tree):
        leaves = jax.tree.leaves(tree)
        return leaves, [_matrix_shape(x) for x in leaves]

    def check(leaves, dims):
        for x, d in zip(leaves, dims, strict=True):
            if d is None and hasattr(x, "shape"):
                raise ValueError(
                    f"scale_by_mofasgd factors 2-D leaves and stacks of them (3-D); got a leaf of "
                    f"shape {tuple(x.shape)} and dtype {x.dtype}: send it elsewhere with "
                    "optax.partition, as omgd_jax.mofasgd does"
                )

    def init_one(w, sub_key, r):
        m, n = w.shape
        if init == "weight_svd":
            return _truncated_svd(w.astype(jnp.float32), r)
        if init == "random":
            a = jax.random.normal(jax.random.fold_in(sub_key, 0), (m, r), jnp.float32)
            b = jax.random.normal(jax.random.fold_in(sub_key, 1), (n, r), jnp.float32)
            return jnp.linalg.qr(a)[0], jnp.zeros(r, jnp.float32), jnp.linalg.qr(b)[0]
        # grad_svd: placeholders, replaced at step 0 from the first gradient.
        eye = lambda k: jnp.eye(k, r, dtype=jnp.float32)
        return eye(m), jnp.zeros(r, jnp.float32), eye(n)

    def on_cpu():
        # SciPy's BLAS threads, started inside XLA:CPU's LAPACK kernels, busy-wait for a core
        # the intra-op pool holds: 1000x slower QRs / SVDs on a shared machine (the GPT-2
        # small-bytes step stalled); see omgd_jax/_src/lapack_threads.py. Set before the first run.
        single_threaded_lapack_on_cpu()

    def init_fn(params):
        on_cpu()
        leaves, dims = shapes(params)
        if is_params_placeholder(params) or not leaves:
            return ScaleByMofasgdState(jnp.zeros([], jnp.int32), *(NotParams(),) * 3)
        check(leaves, dims)
        base_key = canonical_key(key)
        us, ss, vs = [], [], []
        for i, (x, d) in enumerate(zip(leaves, dims, strict=True)):
            if d is None:
                us.append(None), ss.append(None), vs.append(None)
                continue
            w = x if isinstance(x, jax.Array) else jnp.zeros(x.shape, x.dtype)
            r = effective_rank(rank, *d[-2:])
            leaf_key = jax.random.fold_in(base_key, i)
            if len(d) == 3:
                keys = jax.random.split(leaf_key, d[0])
                init_layers = _over_layers(lambda a, k, r=r: init_one(a, k, r), True, like=w)
                u, s, v = init_layers(w, keys)
            else:
                u, s, v = init_one(w, leaf_key, r)
            us.append(u), ss.append(s), vs.append(v)
        return ScaleByMofasgdState(jnp.zeros([], jnp.int32), tuple(us), tuple(ss), tuple(vs))

    def update_leaf(g, stacked, u, s, v, first):
        g32 = g.astype(jnp.float32)
        step = _over_layers(lambda *a: factored_momentum_step(*a, beta), stacked, like=g)
        if init == "grad_svd":
            r = s.shape[-1]
            from_grad = _over_layers(lambda a: _truncated_svd(a, r), stacked, like=g)
            u, s, v = jax.lax.cond(first, lambda: from_grad(g32), lambda: step(u, s, v, g32))
        else:
            u, s, v = step(u, s, v, g32)
        # no LAPACK call: batched everywhere, the layer axis' sharding kept
        direction = _over_layers(lambda *a: _direction(*a, update, max_value, eps), stacked, True)
        return direction(u, s, v).astype(g.dtype), u, s, v

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        on_cpu()
        leaves, treedef = jax.tree.flatten(updates)
        dims = [_matrix_shape(x) for x in leaves]
        check(leaves, dims)
        first = state.mofasgd_count == 0
        out, us, ss, vs = [], [], [], []
        for g, d, u, s, v in zip(
            leaves, dims, state.mofasgd_u, state.mofasgd_s, state.mofasgd_v, strict=True
        ):
            if d is None:
                out.append(g), us.append(None), ss.append(None), vs.append(None)
                continue
            direction, u, s, v = update_leaf(g, len(d) == 3, u, s, v, first)
            out.append(direction)
            us.append(u), ss.append(s), vs.append(v)
        new_state = ScaleByMofasgdState(
            optax.safe_increment(state.mofasgd_count), tuple(us), tuple(ss), tuple(vs)
        )
        return jax.tree.unflatten(treedef, out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def low_rank_labels(low_rank: blocks.Rule | None = None):
    """The ``param_labels`` callable of `mofasgd`: 'mofasgd' for selected matrices, else 'adamw'.

    ``optax.tree.map_params`` calls it on a placeholder, which is labelled 'adamw' as a whole.
    """

    def labels(params):
        if is_params_placeholder(params):
            return ADAMW
        leaves, treedef = jax.tree.flatten(params)
        kinds = blocks.leaf_kinds(params, low_rank, "leaves")
        out = []
        for x, k in zip(leaves, kinds, strict=True):
            if k is not None and x.ndim != (3 if k == blocks.STACKED else 2):
                raise ValueError(
                    f"leaves selected a leaf of shape {tuple(x.shape)} as "
                    f"{'a stack of matrices' if k == blocks.STACKED else 'a matrix'}; MoFaSGD "
                    "factors 2-D leaves and 3-D stacks of them"
                )
            out.append(ADAMW if k is None else LOW_RANK)
        return jax.tree.unflatten(treedef, out)

    return labels


@renamed(low_rank="leaves")
def mofasgd(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    beta: float = 0.95,
    *,
    update: Literal["orthogonal", "inverse_sv"] = "orthogonal",
    max_value: float = 5.0,
    eps: float = 1e-10,
    init: Literal["weight_svd", "grad_svd", "random"] = "weight_svd",
    key: jax.Array | int = 0,
    leaves: blocks.Rule | None = None,
    adamw_learning_rate: optax.ScalarOrSchedule | None = None,
    adamw_b1: float = 0.9,
    adamw_b2: float = 0.95,
    adamw_eps: float = 1e-8,
    adamw_weight_decay: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    r"""MoFaSGD: factored-momentum SGD on the weight matrices, AdamW on everything else.

    The selected matrices get :math:`-\eta\, U V^\top` (or the ``"inverse_sv"`` direction)
    from :func:`scale_by_mofasgd`; every other leaf (embeddings, head, biases, norms, and any
    leaf that is not 2-D) gets ``optax.adamw``, through ``optax.partition``.

    .. math::
        U S V^\top \leftarrow \mathrm{SVD}_r\!\left(\beta\, U S V^\top
        + P_T(G)\right),\qquad W \leftarrow W - \eta\, U V^\top,

    with :math:`P_T(G) = UU^\top G + G VV^\top - UU^\top G VV^\top` the projection of the
    gradient on the tangent space of the rank-r matrices (SPEC §3.2).

    Args:
      learning_rate: :math:`\eta` of the factored part (a float or a schedule).
      rank, beta, update, max_value, eps, init, key: as in :func:`scale_by_mofasgd`.
      leaves: which leaves are factored, a leaf rule as for :func:`omgd_jax.skip_update`
        (default: the 2-D weights of attention and MLP, stacked 3-D ones layer by layer;
        embeddings and the head are not).
      adamw_learning_rate: AdamW's learning rate (default: ``learning_rate``).
      adamw_b1, adamw_b2, adamw_eps, adamw_weight_decay: AdamW's other arguments.

    Returns:
      An ``optax.GradientTransformationExtraArgs``. Its state holds, per factored matrix,
      r(m + n) + r floats instead of AdamW's 2mn.
      For ``optax.inject_hyperparams`` pass ``static_args=omgd_jax.static_args(omgd_jax.mofasgd)``.

    Examples:
      >>> import jax.numpy as jnp, optax, omgd_jax
      >>> tx = omgd_jax.mofasgd(0.02, rank=2)
      >>> params = {"w": jnp.ones((8, 6)), "b": jnp.ones(6)}
      >>> state = tx.init(params)
      >>> u, s, v = (optax.tree.get(state, f"mofasgd_{f}")[0] for f in "usv")  # "w" only
      >>> print(u.shape, s.shape, v.shape)
      (8, 2) (2,) (6, 2)

    References:
      Mahdavinia and Mahdavi, Low-rank Momentum Factorization for Memory Efficient Training
      (MoFaSGD), arXiv 2507.08091, 2025.
    """
    low_rank = leaves
    blocks.check_rule("leaves", low_rank)
    factored = optax.chain(
        scale_by_mofasgd(
            rank, beta, update=update, max_value=max_value, eps=eps, init=init, key=key
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
    adamw = optax.adamw(
        learning_rate if adamw_learning_rate is None else adamw_learning_rate,
        b1=adamw_b1,
        b2=adamw_b2,
        eps=adamw_eps,
        weight_decay=adamw_weight_decay,
    )
    return layers_lib.with_bare_masked_nodes(
        optax.partition({LOW_RANK: factored, ADAMW: adamw}, low_rank_labels(low_rank))
    )
