"""`omgd`, `omgd_adamw`: wrap an optax optimizer so that it runs only where OMGD trains.

`omgd` checks its arguments and dispatches to the compact state (`_src/compact.py`) or the
frozen state (`_src/frozen.py`); `omgd_adamw` is AdamW under it. `static_args` names the
arguments that `optax.inject_hyperparams` must leave alone.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal, get_args

import jax
import optax

from omgd_jax._src import layers as layers_lib
from omgd_jax._src.compact import omgd_compact
from omgd_jax._src.frozen import omgd_frozen
from omgd_jax._src.schedule import (
    Balance,
    Granularity,
    Layout,
    MaskSchedule,
    Traversal,
    check_choice,
    check_key,
)

StateKind = Literal["compact", "frozen"]
STATES = get_args(StateKind)

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
    "units",
    "frozen",
    "state",
    "mask",
    # the baselines' structural arguments (galore, golore, sift, skip_update, magma, mofasgd)
    "leaves",
    "stacked",
    "rank",
    "update_proj_gap",
    "projector_side",
    "svd_steps",
    "sparse_rate",
    "select_step",
    # skip_update / magma (add "p" with traversal="wor": it fixes the number of groups)
    "inner",
    "momentum",
    "decay",
    "unbiased",
    # mofasgd
    "update",
    "init",
)


def static_args(factory) -> tuple[str, ...]:
    """The arguments of ``factory`` that `optax.inject_hyperparams` must leave alone."""
    return tuple(a for a in STATIC_ARGS if a in inspect.signature(factory).parameters)


def omgd(
    inner: optax.GradientTransformation,
    num_masks: int | None = None,
    steps_per_mask: int = 1,
    *,
    state: StateKind = "compact",
    key: jax.Array | int = 0,
    granularity: Granularity = "element",
    traversal: Traversal = "wor",
    scale: bool = True,
    warmup_steps: int = 0,
    layers: layers_lib.LayerSpec | None = None,
    layers_per_phase: int | None = None,
    layout: Layout = "contiguous",
    balance: Balance = "count",
    repartition: bool | None = None,
    units: layers_lib.UnitSpec | None = None,
    frozen: layers_lib.FrozenSpec | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Runs ``inner`` only on OMGD's active share of the parameters.

    The masks are exactly those of :func:`omgd_jax.omgd_mask` with the same arguments. With
    :math:`A_t` the coordinates active at step t (group j of the cycle's partition),
    :math:`S_t` the mask (M on :math:`A_t`, 0 elsewhere, when ``scale=True``) and
    :math:`\mathcal{A}` the inner optimizer with state :math:`s`,

    .. math::
        (u_t|_{A_t},\ s_{t+1}) = \mathcal{A}\big((S_t \odot g_t)|_{A_t},\ s_t,\
        \theta_t|_{A_t}\big), \qquad u_t|_{\overline{A_t}} = 0,

    so ``omgd(optax.sgd(lr), ...)`` equals ``chain(omgd_mask(...), optax.sgd(lr))``.

    Layer granularity, units beyond the layers: with :math:`N_L` layers taken
    :math:`\gamma` at a time and the :math:`E` extra units of ``units=`` (embedding, head,
    final norm), a cycle has :math:`M = G + E` phases, :math:`G = N_L/\gamma`, in a random
    order drawn every cycle (``traversal="wor"``; ``"iid"``: every phase's label drawn
    uniformly from the M). A layers phase trains :math:`\gamma` layers not yet visited in
    the cycle, a unit phase trains its unit alone; every trainable unit :math:`u` (layer or
    extra) is active in exactly one phase :math:`j_u` of the cycle and scaled by M there:

    .. math::
        S^{(j)}_u = M\,\mathbb{1}[j = j_u], \qquad \sum_{j=1}^{M} S^{(j)}_u = M
        \quad \text{for every layer and extra unit } u.

    Leaves picked by neither ``layers=``, ``units=`` nor ``frozen=`` are always active with
    scale 1 (the default: the paper's always-on embedding and head); ``frozen=`` leaves are
    never trained (update exactly zero, no inner state). ``num_masks``, if given, is the
    total M (M - E must divide :math:`N_L`); ``layers_per_phase`` gives :math:`\gamma`.

    What differs from that chain is the inner optimizer's state:

    * ``state="compact"`` (LISA / BAdam): the inner state exists only for the active share,
      in fixed-size buffers (element granularity: a window of ceil(n/M) coordinates per leaf;
      layer granularity: the gamma active layers, plus the always-active leaves), and is
      re-initialised, counters included, whenever the active mask changes. Optimizer memory is
      about 1/M of the inner optimizer's. Extra units (``units=``) share one inner-state slot
      as large as the largest unit's state (``omgd_unit_state``: only the active unit's state
      is live, restarted at every phase change, so a unit's moments start from zero whenever
      it comes back, as a layer's do; the inner state must be numeric arrays); the state
      records the unit the next update trains in ``omgd_unit`` (-1: a layers phase).
      Supports ``granularity`` "element" (with ``layout="contiguous"`` or ``"strided"``) and
      "layer", and ``warmup_steps=0`` (warm up with ``inner`` alone, then switch, as
      ``examples/gpt2`` does).
    * ``state="frozen"`` (the paper's released code): a full inner state per unit (leaf, or
      layer of a stacked leaf) with its own step counter; inactive units keep their parameters
      and state untouched and get no weight decay. Saves no memory. Since ``inner`` runs leaf
      by leaf, transformations inside it that couple leaves (global-norm clipping) see one
      unit at a time: clip before ``omgd``.

    Either way a learning-rate schedule *inside* ``inner`` would follow the inner counter;
    put it after ``omgd`` (``optax.scale_by_learning_rate``), as :func:`omgd_adamw` does.

    Sharded parameters: compact element windows stay on their shards (no data moves) and each
    device holds 1/M of its shard's inner state; layer views keep the non-layer axes'
    sharding. With ``layout="strided"`` (band j = rows j, j + M, ... of the leading axis) the
    bands are the same on every mesh whose row shards hold a multiple of M rows: a run on 8
    devices trains what it trains on one. With ``layout="contiguous"`` the bands are cut inside
    every shard (the shard grid, read by ``init`` from the leaf's `NamedSharding` and kept in
    the state), so they depend on the mesh.

    Non-finite gradients: a step counts whatever its gradient holds (the phase advances; compact
    buffers restart when the mask changes). Wrap in ``optax.apply_if_finite`` (or
    ``optax.MultiSteps(..., should_skip_update_fn=optax.skip_not_finite)``) to drop such a step
    whole: the traversal then does not advance.

    Args:
      inner: the optax optimizer to run on the active share.
      num_masks: M, the number of disjoint masks of a cycle (keep ratio 1/M). For
        ``granularity="layer"`` it may be left None when ``layers_per_phase`` is given.
      steps_per_mask: K, optimizer steps each mask is held.
      state: ``"compact"`` (inner state over the active share only, restarted when the mask
        changes) or ``"frozen"`` (full inner state per unit, inactive units untouched).
      key: PRNG key or int seed of the masks.
      granularity: ``"element"``, ``"tensor"`` (frozen only) or ``"layer"``; see
        :func:`omgd_jax.omgd_mask`.
      traversal: ``"wor"`` (OMGD) or ``"iid"`` (with layer granularity and ``scale=False``:
        LISA).
      scale: multiply the active share's gradient by M before ``inner`` sees it.
      warmup_steps: full-gradient steps before masking starts (frozen only; 0 for compact).
      layers: for ``granularity="layer"``: which leaves are transformer layers (a regex on the
        '/'-joined key path or a callable), as in :func:`omgd_jax.omgd_mask`.
      layers_per_phase: gamma, the layers trained at once (layer granularity); M = N_L / gamma.
      layout: element granularity: ``"contiguous"`` bands, ``"strided"`` row bands (the same
        on every mesh under FSDP) or ``"random"`` (a hash partition; frozen only).
      balance: tensor granularity: cut the permuted leaves by ``"count"`` or by ``"size"``.
      repartition: None (default): a fresh partition every cycle wherever the layout has
        one to draw (random layout, tensor and layer granularity; contiguous bands are fixed,
        their order redrawn every cycle); True: the same, refused for contiguous bands; False:
        one partition drawn once, its order reshuffled every cycle (the released code).
      units: layer granularity: leaves that are not layers and join the traversal as units of
        their own (embedding, head, final norm), in the vocabulary of ``layers``: a regex on
        the '/'-joined key path (no capture group: every matched leaf is its own unit; a
        capture group: leaves with the same captured text form one unit) or a callable
        ``(path, leaf) -> None | str`` naming the unit. None (default): everything that is not
        a layer is always active. A state initialised without extra units is refused by a
        configuration with them (and the converse).
      frozen: layer granularity: leaves never trained, a regex or a callable
        ``(path, leaf) -> bool``: update exactly zero, no inner state. A leaf may be picked by
        one of ``layers``, ``units`` and ``frozen`` at most.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an `OmgdCompactState` or an
      `OmgdFrozenState`. ``update`` takes the extra argument ``mask_index`` (see
      :func:`omgd_jax.omgd_mask`) and forwards every other extra argument to ``inner``.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax, omgd_jax
      >>> tx = omgd_jax.omgd(optax.adam(1e-3), num_masks=4, steps_per_mask=10)
      >>> params = {"w": jnp.zeros((64, 64))}
      >>> state = tx.init(params)
      >>> print(optax.tree.get(state, "mu")["w"].shape)  # Adam's moments: a quarter of 4096
      (1024, 1)
      >>> updates, state = tx.update({"w": jnp.ones((64, 64))}, state, params)
      >>> print(int((updates["w"] != 0).sum()))  # only the active quarter moves
      1024

      The embedding and the head join the traversal: 4 layers 2 at a time plus 2 units, M = 4.

      >>> params = {"wte": jnp.ones((5, 2)), "blocks": jnp.ones((4, 2)), "head": jnp.ones(2)}
      >>> tx = omgd_jax.omgd(optax.sgd(1.0), granularity="layer", layers="^blocks",
      ...                    layers_per_phase=2, units="^(wte|head)$")
      >>> state, trained = tx.init(params), []
      >>> for _ in range(4):  # one cycle: the layers twice (2 + 2), the embedding, the head
      ...     u, state = tx.update(params, state, params)
      ...     trained.append(" ".join(k for k in sorted(u) if np.any(u[k])))
      ...     assert min(float(v.min()) for v in u.values()) == -4.0  # scaled by M = 4
      >>> sorted(trained)
      ['blocks', 'blocks', 'head', 'wte']

    References:
      Yang et al., Omni-Masked Gradient Descent, arXiv 2603.05960, 2026.
      Pan et al., LISA: Layerwise Importance Sampling for Memory-Efficient Large Language
      Model Fine-Tuning, arXiv 2403.17919, 2024.
      Luo et al., BAdam: A Memory Efficient Full Parameter Optimization Method for Large
      Language Models, arXiv 2404.02827, 2024.
    """
    schedule = MaskSchedule.from_args(locals())
    state_kind = check_choice("state", state, STATES)
    check_key(key)
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(f"inner must be an optax.GradientTransformation, got {inner!r}")
    if state_kind == "compact":
        return omgd_compact(inner, schedule, key)
    return omgd_frozen(inner, schedule, key)


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
    state: StateKind = "compact",
    key: jax.Array | int = 0,
    granularity: Granularity = "element",
    traversal: Traversal = "wor",
    scale: bool = True,
    warmup_steps: int = 0,
    layers: layers_lib.LayerSpec | None = None,
    layers_per_phase: int | None = None,
    layout: Layout = "contiguous",
    balance: Balance = "count",
    repartition: bool | None = None,
    units: layers_lib.UnitSpec | None = None,
    frozen: layers_lib.FrozenSpec | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AdamW under OMGD: ``optax.adamw``'s arguments plus those of :func:`omgd`.

    On the active share :math:`A_t` of step t (see :func:`omgd`), with
    :math:`\tilde g_t = (S_t \odot g_t)|_{A_t}` and :math:`n` the inner step count (restarted
    with every mask for ``state="compact"``, per unit for ``state="frozen"``),

    .. math::
        m &\leftarrow \beta_1 m + (1 - \beta_1) \tilde g_t, \qquad
        v \leftarrow \beta_2 v + (1 - \beta_2) \tilde g_t^2, \\
        u_t|_{A_t} &= -\eta_t \Big( \frac{m / (1 - \beta_1^n)}
        {\sqrt{v / (1 - \beta_2^n) + \epsilon_{root}} + \epsilon}
        + \lambda\, \theta_t|_{A_t} \Big), \qquad u_t|_{\overline{A_t}} = 0.

    The learning rate :math:`\eta_t` (and its schedule) is applied after the wrapper, so it
    follows the global optimizer step t whatever the inner counters do; Adam and the
    decoupled weight decay :math:`\lambda` run inside, so inactive coordinates are not
    decayed. For `optax.inject_hyperparams` pass
    ``static_args=omgd_jax.static_args(omgd_jax.omgd_adamw)``.

    Layer granularity with ``units=``: the active share :math:`A_t` of a phase is either
    :math:`\gamma` layers or one extra unit; a cycle is :math:`M = N_L/\gamma + E` phases,
    each trainable unit active (and scaled by M) in exactly one of them, so
    :math:`\sum_j S^{(j)} = M \cdot \mathbf{1}` on the layers and the extra units (see
    :func:`omgd`); always-active leaves run AdamW at every step with scale 1, ``frozen=``
    leaves never move and are not decayed. With ``state="compact"`` and no ``mask``, AdamW is
    elementwise, so the layer view's moments share the extra units' slot (they are dead in
    the units' phases, as the units' are in the layers'): updated there leaf by leaf, in
    place, when their arrays fit in the buffers the largest unit needs (Llama-3.1-8B: two
    layers' moments inside the embedding's), so the state costs the largest unit's moments
    and not those plus the view's; otherwise the view keeps a state of its own.

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule of the global step.
      b1: :math:`\beta_1`, decay of the first moment.
      b2: :math:`\beta_2`, decay of the second moment.
      eps: :math:`\epsilon`, added to the denominator outside the square root.
      eps_root: :math:`\epsilon_{root}`, added inside the square root.
      mu_dtype: dtype of the first moment (None: that of the parameters).
      weight_decay: :math:`\lambda`, decoupled weight decay.
      mask: which weights are decayed: a tree of bools or a callable on the params,
        evaluated on the full parameter tree (as ``optax.adamw``'s ``mask``).
      nesterov: Nesterov momentum (``optax.scale_by_adam``'s ``nesterov``).
      num_masks: M, see :func:`omgd`.
      steps_per_mask: K, see :func:`omgd`.
      state: ``"compact"`` or ``"frozen"``, see :func:`omgd`.
      key: PRNG key or int seed of the masks.
      granularity: ``"element"``, ``"tensor"`` (frozen only) or ``"layer"``.
      traversal: ``"wor"`` or ``"iid"``.
      scale: multiply the active share's gradient by M.
      warmup_steps: full-gradient steps before masking starts (frozen only).
      layers: for ``granularity="layer"``: which leaves are transformer layers.
      layers_per_phase: gamma, the layers trained at once (layer granularity).
      layout: element granularity: ``"contiguous"``, ``"strided"`` or ``"random"`` (frozen
        only); see :func:`omgd`.
      balance: tensor granularity: ``"count"`` or ``"size"``.
      repartition: None (default): a fresh partition every cycle wherever the layout has
        one to draw (random layout, tensor and layer granularity; contiguous bands are fixed,
        their order redrawn every cycle); True: the same, refused for contiguous bands; False:
        one partition drawn once, its order reshuffled every cycle (the released code).
      units: layer granularity: leaves that are not layers and join the traversal as units of
        their own (embedding, head, final norm), in the vocabulary of ``layers``: a regex on
        the '/'-joined key path (no capture group: every matched leaf is its own unit; a
        capture group: leaves with the same captured text form one unit) or a callable
        ``(path, leaf) -> None | str`` naming the unit. None (default): everything that is not
        a layer is always active. A state initialised without extra units is refused by a
        configuration with them (and the converse).
      frozen: layer granularity: leaves never trained, a regex or a callable
        ``(path, leaf) -> bool``: update exactly zero, no inner state. A leaf may be picked by
        one of ``layers``, ``units`` and ``frozen`` at most.

    Returns:
      An ``optax.GradientTransformationExtraArgs``: ``optax.chain`` of the wrapped Adam with
      decay and ``optax.scale_by_learning_rate``; extra args are forwarded.

    Examples:
      >>> import jax.numpy as jnp, omgd_jax
      >>> tx = omgd_jax.omgd_adamw(1e-3, weight_decay=0.1, num_masks=4, steps_per_mask=10)
      >>> params = {"w": jnp.ones((8, 8))}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.ones((8, 8))}, state, params)
      >>> print(int((updates["w"] != 0).sum()))  # a quarter of the 64 weights moves
      16
      >>> print(round(float(updates["w"].min()), 6))  # -lr * (Adam's first step 1 + 0.1 * 1)
      -0.0011

    References:
      Yang et al., Omni-Masked Gradient Descent, arXiv 2603.05960, 2026.
      Loshchilov and Hutter, Decoupled Weight Decay Regularization, arXiv 1711.05101, 2019.
    """
    schedule = MaskSchedule.from_args(locals())
    state_kind = check_choice("state", state, STATES)
    check_key(key)

    def adam_with_decay(decay: bool, decay_mask=None):
        return optax.chain(
            optax.scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
            optax.add_decayed_weights(weight_decay, decay_mask) if decay else optax.identity(),
        )

    if state_kind == "compact":
        wrapped = omgd_compact(adam_with_decay(True, mask), schedule, key, elementwise=mask is None)
    else:
        # frozen runs Adam leaf by leaf: decide the decay per leaf on the full tree.
        decayed, not_decayed = adam_with_decay(True), adam_with_decay(False)

        def inners_for_leaves(params):
            flags = mask(params) if callable(mask) else mask
            if flags is None:
                return [decayed] * len(jax.tree.leaves(params))
            return [decayed if f else not_decayed for f in jax.tree.leaves(flags)]

        wrapped = omgd_frozen(decayed, schedule, key, inners_for_leaves=inners_for_leaves)
    return optax.chain(wrapped, optax.scale_by_learning_rate(learning_rate))
