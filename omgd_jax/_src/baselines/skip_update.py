"""SkipUpdate and Magma (arXiv 2602.15322): randomly masked parameter updates of any optimizer.

The inner optimizer runs densely every step (its moments see every gradient); only the update it
proposes is masked, one Bernoulli draw per *block*. A block is one tensor, or one layer of a
stacked ``[N_L, m, n]`` leaf. Which leaves are blocks is chosen by ``leaves``, a leaf rule
(omgd_jax/_src/blocks.py): by default the 2-D weights of attention and MLP (on the GPT-2 example
the four kernels of ``blocks/attn`` and ``blocks/mlp``, one draw per layer); embeddings, the
head, norms and biases stay dense.

Masks are a pure function of a typed PRNG key in the state and the step counter, so every
replica draws the same ones.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from omgd_jax._src import blocks
from omgd_jax._src.arguments import renamed
from omgd_jax._src.placeholder import NotParams, is_params_placeholder
from omgd_jax._src.schedule import canonical_key, check_choice, check_key

Masked = blocks.Rule
Traversal = Literal["iid", "wor"]
TRAVERSALS = ("iid", "wor")
MOMENTA = ("after", "before")
DECAYS = ("masked", "dense")
# Names the first moment has in optax states, tried in order (ScaleByAdamState.mu, TraceState).
MOMENT_FIELDS = ("mu", "trace")

_WOR_SALT = 7  # separates the wor partition stream from the iid draws


class SkipUpdateState(NamedTuple):
    """State of `skip_update`: the mask of a step is a function of (skip_key, skip_step)."""

    skip_key: jax.Array  # typed PRNG key of the masks.
    skip_step: jax.Array  # int32, optimizer steps taken.
    skip_inner_state: Any  # state of the inner optimizer, updated densely every step.


class MagmaState(NamedTuple):
    """State of `magma`: `SkipUpdateState`'s fields plus one smoothed score per block."""

    magma_key: jax.Array  # typed PRNG key of the masks.
    magma_step: jax.Array  # int32, optimizer steps taken.
    magma_score: (
        Any  # tuple, per leaf: float32 (1,) or (N_L,) EMA score s_b (0.5 at init); None: dense.
    )
    magma_inner_state: Any  # state of the inner optimizer, updated densely every step.


def block_counts(tree, masked: Masked | None = None) -> list[int]:
    """Per leaf (``jax.tree.leaves`` order) the number of masked blocks: 0 (dense), 1 or N_L."""
    kinds = blocks.leaf_kinds(tree, masked, "leaves")
    return [
        0 if k is None else 1 if k == blocks.TENSOR else int(x.shape[0])
        for k, x in zip(kinds, jax.tree.leaves(tree), strict=True)
    ]


def num_groups(p: float) -> int:
    """Groups of a ``traversal="wor"`` cycle: round(1/p), at least 1."""
    return max(1, round(1.0 / p))


def draw_blocks(key, step, p, num_blocks: int, traversal: str):
    """z_b in {0, 1} for the ``num_blocks`` blocks at ``step`` (float32[num_blocks]).

    iid: independent Bernoulli(p) draws from ``fold_in(key, step)``. wor: cycle k = step // M
    partitions the blocks into M = round(1/p) groups of (nearly) equal count from
    ``fold_in(key, k)`` and step k M + j keeps group j, so each block is kept once per cycle.
    """
    step = jnp.asarray(step, jnp.int32)
    if traversal == "iid":
        z = jax.random.bernoulli(jax.random.fold_in(key, step), p, (num_blocks,))
        return z.astype(jnp.float32)
    m = num_groups(p)
    cycle, group = step // m, step % m
    perm = jax.random.permutation(
        jax.random.fold_in(jax.random.fold_in(key, cycle), _WOR_SALT), num_blocks
    )
    labels = (
        jnp.zeros(num_blocks, jnp.int32)
        .at[perm]
        .set(jnp.arange(num_blocks, dtype=jnp.int32) * m // max(num_blocks, 1))
    )
    return (labels == group).astype(jnp.float32)


def _split(flat_blocks, counts):
    """Cuts a float[B] vector into per-leaf pieces: None (dense), () or (N_L,)."""
    out, start = [], 0
    for c in counts:
        out.append(None if c == 0 else flat_blocks[start : start + c])
        start += c
    return out


def _broadcast(value, leaf, count):
    """A per-block value ((1,) or (N_L,)) shaped to broadcast against ``leaf``."""
    if count == 1:  # one block (a stack of one layer broadcasts the same way)
        return value.reshape(()).astype(leaf.dtype)
    return value.reshape((count,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)


def _block_dot(a, b, count):
    """Per block sum(a * b): a scalar, or (N_L,) over the trailing axes."""
    prod = (a.astype(jnp.float32) * b.astype(jnp.float32)).reshape(count, -1)
    return prod.sum(axis=1)


def block_cosine(mu, g, count):
    """cos(mu_b, g_b) per block, 0 where either norm is 0 (float32[count])."""
    dot = _block_dot(mu, g, count)
    norms = jnp.sqrt(_block_dot(mu, mu, count) * _block_dot(g, g, count))
    return jnp.where(norms > 0, dot / jnp.where(norms > 0, norms, 1.0), 0.0)


def _check_common(p, traversal, decay, weight_decay):
    check_choice("traversal", traversal, TRAVERSALS)
    check_choice("decay", decay, DECAYS)
    if isinstance(p, int | float) and not isinstance(p, bool):
        if not 0.0 < p <= 1.0:
            raise ValueError(f"p must be in (0, 1], got {p}")
    elif traversal == "wor":
        raise TypeError(
            f"p must be a Python float in (0, 1] with traversal='wor' (it fixes the number of "
            f"groups; list 'p' in inject_hyperparams' static_args), got {p!r}"
        )
    if isinstance(weight_decay, int | float) and weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


def _decayer(weight_decay, decay_mask):
    if isinstance(weight_decay, int | float) and weight_decay == 0:
        return None
    decayer = optax.add_decayed_weights(weight_decay, decay_mask)

    def add_decay(updates, params):
        if params is None:
            raise ValueError("weight_decay needs params: call update(grads, state, params)")
        return decayer.update(updates, decayer.init(params), params)[0]

    return add_decay


def _wrapped(
    inner, key, p, masked, traversal, decay, weight_decay, decay_mask, scorer, state_cls
) -> optax.GradientTransformationExtraArgs:
    """The shared skeleton: dense inner update, per-block factor, optional decay."""
    inner = optax.with_extra_args_support(inner)
    add_decay = _decayer(weight_decay, decay_mask)

    def init_fn(params):
        if is_params_placeholder(params):
            extra = (NotParams(),) if scorer is not None else ()
            return state_cls(
                canonical_key(key), jnp.zeros([], jnp.int32), *extra, inner.init(params)
            )
        fields = [canonical_key(key), jnp.zeros([], jnp.int32)]
        if scorer is not None:
            counts = block_counts(params, masked)
            score = tuple(None if c == 0 else jnp.full((c,), 0.5, jnp.float32) for c in counts)
            fields.append(score)
        return state_cls(*fields, inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        key_, step = state[0], state[1]
        inner_state = state[-1]
        delta, new_inner = inner.update(updates, inner_state, params, **extra_args)
        if add_decay is not None and decay == "masked":
            delta = add_decay(delta, params)
        leaves, treedef = jax.tree.flatten(delta)
        counts = block_counts(delta, masked)
        z = _split(draw_blocks(key_, step, p, sum(counts), traversal), counts)
        if scorer is None:
            scale = float(num_groups(p)) if traversal == "wor" else 1.0 / p
            factors = [None if zi is None else zi * scale for zi in z]
            extra_fields = ()
        else:
            factors, new_score = scorer(updates, leaves, counts, z, state, inner_state, new_inner)
            extra_fields = (new_score,)
        out = [
            u if f is None else u * _broadcast(f, u, c)
            for u, f, c in zip(leaves, factors, counts, strict=True)
        ]
        out = jax.tree.unflatten(treedef, out)
        if add_decay is not None and decay == "dense":
            out = add_decay(out, params)
        step = optax.safe_increment(step)
        return out, state_cls(key_, step, *extra_fields, new_inner)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@renamed(masked="leaves", decay_mask="mask")
def skip_update(
    inner: optax.GradientTransformation,
    p: float = 0.5,
    *,
    key: jax.Array | int = 0,
    leaves: Masked | None = None,
    traversal: Traversal = "iid",
    weight_decay: float = 0.0,
    decay: Literal["masked", "dense"] = "masked",
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SkipUpdate: the inner optimizer's update, kept per block with probability p, scaled 1/p.

    With :math:`\Delta_b` the update ``inner`` proposes for block b (its state is updated
    densely every step),

    .. math::
        z_b \sim \mathrm{Bernoulli}(p), \qquad
        \theta_b \leftarrow \theta_b + \frac{z_b}{p} \Delta_b,

    so :math:`\mathbb{E}[z_b / p \, \Delta_b] = \Delta_b`. Leaves that are not blocks (see
    ``masked``) get :math:`\Delta` unchanged.

    ``traversal="wor"`` (beyond the paper, OMGD's rule): every cycle of M = round(1/p) steps
    partitions the blocks into M groups of nearly equal count, afresh from
    ``fold_in(key, cycle)``, and keeps one group per step, scaled by M (= 1/p when 1/p is an
    integer): every block is updated exactly once per cycle.

    Args:
      inner: any optax optimizer (its output, with its learning rate, is :math:`\Delta`).
      p: keep probability of a block, in (0, 1].
      key: PRNG key or int seed of the masks.
      leaves: which leaves are blocks: None (the default rule), a regex on the '/'-joined key
        path, or a callable ``(path, leaf) -> bool | "stacked"`` (a 3-D match is a stack of
        layers, one block per layer).
      traversal: ``"iid"`` (the paper's Bernoulli) or ``"wor"`` (without replacement).
      weight_decay: adds ``weight_decay * params`` to the update in ``inner``'s output units.
        Use it with an ``inner`` that returns a direction (``optax.scale_by_adam()``) and put
        the learning rate after the wrapper, as :func:`skip_update_adamw` does; leave it 0 when
        ``inner`` decays the weights itself (that decay is then masked with :math:`\Delta`).
      decay: ``"masked"``: the decay is part of :math:`\Delta` (masked and scaled with it);
        ``"dense"``: applied to every leaf every step, after masking.
      mask: which leaves are decayed, as ``optax.add_decayed_weights``' ``mask``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra args are forwarded to ``inner``.
      For ``optax.inject_hyperparams`` pass ``static_args=omgd_jax.static_args(omgd_jax.magma)``
      (plus ``"p"`` with ``traversal="wor"``).

    Examples:
      >>> import jax.numpy as jnp, optax, omgd_jax
      >>> tx = omgd_jax.skip_update(optax.sgd(1.0), p=0.5, traversal="wor")
      >>> params = {"a": jnp.zeros((2, 2)), "b": jnp.zeros((2, 2))}
      >>> state = tx.init(params)
      >>> g = {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}
      >>> u1, state = tx.update(g, state, params)
      >>> u2, state = tx.update(g, state, params)
      >>> print(u1["a"][0, 0] + u2["a"][0, 0], u1["b"][0, 0] + u2["b"][0, 0])  # once each, x2
      -2.0 -2.0

    References:
      Joo et al., Masked updates in adaptive optimizers (SkipUpdate, Magma), arXiv 2602.15322.
    """
    masked = leaves
    decay_mask = mask
    _check_common(p, traversal, decay, weight_decay)
    blocks.check_rule("leaves", masked)
    check_key(key)
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(f"inner must be an optax.GradientTransformation, got {inner!r}")
    return _wrapped(
        inner, key, p, masked, traversal, decay, weight_decay, decay_mask, None, SkipUpdateState
    )


def _first_moment(inner_state):
    for name in MOMENT_FIELDS:
        mu = optax.tree.get(inner_state, name)
        if mu is not None:
            return mu
    raise ValueError(
        f"magma needs the inner optimizer's first moment but its state has no field named any "
        f"of {MOMENT_FIELDS} (e.g. optax.adam's ScaleByAdamState.mu or optax.sgd(momentum=...)'s "
        f"TraceState.trace); the state is {jax.tree.structure(inner_state)}"
    )


@renamed(masked="leaves", decay_mask="mask")
def magma(
    inner: optax.GradientTransformation,
    p: float = 0.5,
    tau: float = 2.0,
    *,
    key: jax.Array | int = 0,
    ema: float = 0.9,
    momentum: Literal["after", "before"] = "after",
    decay: Literal["masked", "dense"] = "masked",
    unbiased: bool = False,
    leaves: Masked | None = None,
    traversal: Traversal = "iid",
    weight_decay: float = 0.0,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Magma: masked updates weighted by a smoothed momentum-gradient alignment score.

    Per block b, with :math:`\mu_b` the inner optimizer's first moment and :math:`g_b` the
    gradient,

    .. math::
        \tilde s_b = \sigma\!\left(\frac{\cos(\mu_b, g_b)}{\tau}\right), \quad
        s_b \leftarrow \mathrm{ema}\, s_b + (1 - \mathrm{ema})\, \tilde s_b, \quad
        \theta_b \leftarrow \theta_b + s_b z_b \Delta_b, \quad z_b \sim \mathrm{Bernoulli}(p),

    with :math:`s_b = 0.5` at the start, :math:`\cos = 0` when a norm is 0, and no 1/p (the
    paper's Algorithm 1): the expected step is about :math:`p/2 \cdot \Delta`, so retune the
    learning rate, or set ``unbiased=True`` for :math:`s_b z_b / p`. The score is updated every
    step for every block, kept or not.

    Args:
      inner: any optax optimizer with a first moment in its state (a field named ``mu``, as
        ``optax.adam``'s, or ``trace``, as ``optax.sgd(momentum=...)``'s).
      p: keep probability of a block, in (0, 1].
      tau: temperature of the sigmoid.
      key: PRNG key or int seed of the masks.
      ema: smoothing of the score.
      momentum: ``"after"``: :math:`\mu` once it has absorbed this step's gradient (the inner
        state after its update; default), ``"before"``: the moment of the previous step.
      decay: ``"masked"`` (default): weight decay is part of :math:`\Delta` and masked with it;
        ``"dense"``: applied to every leaf every step. See :func:`skip_update`'s
        ``weight_decay``.
      unbiased: scale kept blocks by 1/p (M with ``traversal="wor"``).
      leaves: which leaves are blocks, as in :func:`skip_update`.
      traversal: ``"iid"`` or ``"wor"``, as in :func:`skip_update`.
      weight_decay: as in :func:`skip_update`.
      mask: as in :func:`skip_update`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra args are forwarded to ``inner``.
      For ``optax.inject_hyperparams`` pass ``static_args=omgd_jax.static_args(omgd_jax.magma)``
      (plus ``"p"`` with ``traversal="wor"``).

    Examples:
      >>> import jax.numpy as jnp, optax, omgd_jax
      >>> tx = omgd_jax.magma(optax.sgd(1.0, momentum=0.5), p=1.0)
      >>> params = {"w": jnp.zeros((2, 2))}
      >>> state = tx.init(params)
      >>> u, state = tx.update({"w": jnp.ones((2, 2))}, state, params)
      >>> s = 0.9 * 0.5 + 0.1 / (1 + jnp.exp(-1 / 2))  # cos(mu, g) = 1, tau = 2
      >>> print(bool(jnp.allclose(u["w"], -s)), state.magma_score[0].shape)
      True (1,)

    References:
      Joo et al., Masked updates in adaptive optimizers (SkipUpdate, Magma), arXiv 2602.15322.
    """
    masked = leaves
    decay_mask = mask
    _check_common(p, traversal, decay, weight_decay)
    blocks.check_rule("leaves", masked)
    check_choice("momentum", momentum, MOMENTA)
    check_key(key)
    if not isinstance(unbiased, bool):
        raise TypeError(f"unbiased must be a bool, got {unbiased!r}")
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(f"inner must be an optax.GradientTransformation, got {inner!r}")
    for name, value in (("tau", tau), ("ema", ema)):
        if isinstance(value, int | float) and not isinstance(value, bool):
            if name == "tau" and value <= 0:
                raise ValueError(f"tau must be > 0, got {value}")
            if name == "ema" and not 0.0 <= value < 1.0:
                raise ValueError(f"ema must be in [0, 1), got {value}")

    def scorer(grads, leaves, counts, z, state, old_inner, new_inner):
        mu = _first_moment(new_inner if momentum == "after" else old_inner)
        mu_leaves, g_leaves = jax.tree.leaves(mu), jax.tree.leaves(grads)
        if len(mu_leaves) != len(leaves):
            raise ValueError(
                f"magma: the first moment has {len(mu_leaves)} leaves, the updates {len(leaves)}"
            )
        scale = (float(num_groups(p)) if traversal == "wor" else 1.0 / p) if unbiased else 1.0
        factors, scores = [], []
        for m, g, c, zi, s in zip(mu_leaves, g_leaves, counts, z, state.magma_score, strict=True):
            if c == 0:
                factors.append(None)
                scores.append(None)
                continue
            s_tilde = jax.nn.sigmoid(block_cosine(m, g, c) / tau)
            s_new = (ema * s + (1.0 - ema) * s_tilde).astype(jnp.float32)
            scores.append(s_new)
            factors.append(s_new * zi * scale)
        return factors, tuple(scores)

    return _wrapped(
        inner, key, p, masked, traversal, decay, weight_decay, decay_mask, scorer, MagmaState
    )


def _adam_alias(wrapper, learning_rate, b1, b2, eps, weight_decay, decay_mask, **kwargs):
    return optax.chain(
        wrapper(
            optax.scale_by_adam(b1, b2, eps),
            weight_decay=weight_decay,
            mask=decay_mask,
            **kwargs,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


@renamed(masked="leaves", decay_mask="mask")
def skip_update_adamw(
    learning_rate: optax.ScalarOrSchedule,
    p: float = 0.5,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    mask: Any = None,
    *,
    key: jax.Array | int = 0,
    leaves: Masked | None = None,
    traversal: Traversal = "iid",
    decay: Literal["masked", "dense"] = "masked",
) -> optax.GradientTransformationExtraArgs:
    r"""AdamW under :func:`skip_update`: ``scale_by_adam`` inside, decay per ``decay``, lr after.

    With :math:`\Delta_b` Adam's direction for block b (moments updated densely every step) and
    :math:`z_b \sim \mathrm{Bernoulli}(p)` (or OMGD's without-replacement groups),

    .. math::
        \theta_b \leftarrow \theta_b - \eta_t \left(\tfrac{z_b}{p}\,\Delta_b
        + \lambda\,\theta_b\right),

    the decay term masked with :math:`z_b` (``decay="masked"``) or applied to every block
    (``"dense"``).

    Args:
      learning_rate: :math:`\eta_t`, a float or an optax schedule (applied after the wrapper,
        so it follows the global step).
      p: keep probability of a block.
      b1, b2, eps: Adam's (``optax.scale_by_adam``).
      weight_decay: :math:`\lambda`, decoupled.
      mask: which leaves are decayed (a tree of bools or a callable on the params).
      key, masked, traversal, decay: as in :func:`skip_update`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, omgd_jax
      >>> tx = omgd_jax.skip_update_adamw(1e-3, p=0.5, weight_decay=0.0)
      >>> params = {"w": jnp.zeros((4, 4)), "v": jnp.zeros((4, 4))}
      >>> u, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
      >>> sorted(round(float(abs(x).max()), 4) for x in u.values())  # dropped, or 1/p times Adam's
      [0.0, 0.002]

    References:
      Joo et al., SkipUpdate and Magma: randomly masked updates in adaptive optimizers,
      arXiv 2602.15322, 2026.
    """
    masked = leaves
    decay_mask = mask
    return _adam_alias(
        skip_update,
        learning_rate,
        b1,
        b2,
        eps,
        weight_decay,
        decay_mask,
        p=p,
        key=key,
        leaves=masked,
        traversal=traversal,
        decay=decay,
    )


@renamed(masked="leaves", decay_mask="mask")
def magma_adamw(
    learning_rate: optax.ScalarOrSchedule,
    p: float = 0.5,
    tau: float = 2.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    mask: Any = None,
    *,
    key: jax.Array | int = 0,
    ema: float = 0.9,
    momentum: Literal["after", "before"] = "after",
    decay: Literal["masked", "dense"] = "masked",
    unbiased: bool = False,
    leaves: Masked | None = None,
    traversal: Traversal = "iid",
) -> optax.GradientTransformationExtraArgs:
    r"""AdamW under :func:`magma`: ``scale_by_adam`` inside, decay per ``decay``, lr after.

    With :math:`\mu_b` Adam's first moment and :math:`g_b` the gradient of block b,

    .. math::
        \tilde s_b = \sigma\!\left(\cos(\mu_b, g_b)/\tau\right),\quad
        s_b \leftarrow 0.9\, s_b + 0.1\, \tilde s_b,\quad
        \theta_b \leftarrow \theta_b - \eta_t\left(s_b z_b \Delta_b + \lambda\theta_b\right),

    no :math:`1/p` (unless ``unbiased``), so the expected step is about a quarter of Adam's:
    retune the learning rate.

    Args:
      learning_rate: :math:`\eta_t`, a float or an optax schedule (applied after the wrapper).
      p: keep probability of a block.
      tau: :math:`\tau`, the temperature of the score.
      b1, b2, eps: Adam's (``optax.scale_by_adam``).
      weight_decay: :math:`\lambda`, decoupled.
      mask: which leaves are decayed (a tree of bools or a callable on the params).
      key, ema, momentum, decay, unbiased, masked, traversal: as in :func:`magma`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, optax, omgd_jax
      >>> tx = omgd_jax.magma_adamw(1e-3, weight_decay=0.1, decay="dense")
      >>> params = {"w": jnp.ones((4, 4))}
      >>> _, state = tx.update(params, tx.init(params), params)
      >>> score = optax.tree.get(state, "magma_score")[0]  # one score per masked block
      >>> print(round(float(score[0]), 4))  # 0.9 * 0.5 + 0.1 * sigmoid(cos(mu, g) / 2), cos = 1
      0.5122

    References:
      Joo et al., SkipUpdate and Magma: randomly masked updates in adaptive optimizers,
      arXiv 2602.15322, 2026.
    """
    masked = leaves
    decay_mask = mask
    return _adam_alias(
        magma,
        learning_rate,
        b1,
        b2,
        eps,
        weight_decay,
        decay_mask,
        p=p,
        tau=tau,
        key=key,
        ema=ema,
        momentum=momentum,
        decay=decay,
        unbiased=unbiased,
        leaves=masked,
        traversal=traversal,
    )
