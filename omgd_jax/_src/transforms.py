"""`omgd_mask`: OMGD's masked gradient as a composable optax transformation."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from omgd_jax._src import layers as layers_lib
from omgd_jax._src.schedule import (
    Balance,
    Granularity,
    Layout,
    MaskSchedule,
    Traversal,
    canonical_key,
    check_key,
)


class OmgdMaskState(NamedTuple):
    """State of `omgd_mask`: the mask of any step is a pure function of these two fields."""

    omgd_key: jax.Array  # typed PRNG key; every cycle's partition is fold_in(omgd_key, cycle).
    omgd_step: jax.Array  # int32, optimizer steps taken (warm-up included).


def init_mask_state(key: jax.Array | int) -> OmgdMaskState:
    """The mask fields at step 0 (also the first two fields of the compact and frozen states)."""
    return OmgdMaskState(omgd_key=canonical_key(key), omgd_step=jnp.zeros([], jnp.int32))


def next_unit(schedule: MaskSchedule, plan: layers_lib.Plan, key: jax.Array, step: jax.Array):
    """The extra unit the update at ``step`` trains (int32; -1: a layers phase), as the compact
    and frozen states store it (``omgd_unit``); EmptyState() without extra units."""
    if not plan.num_extra:
        return optax.EmptyState()
    return schedule.active(plan, key, step).unit


def check_units_record(plan: layers_lib.Plan, record, units) -> None:
    """Refuses a state written with extra units for a tree without them, and the converse.

    ``record`` is the state's ``omgd_unit``: an int32 array exactly when the state was
    initialised with extra units (a checkpoint carries it), EmptyState() otherwise.
    """
    recorded = isinstance(record, jax.Array | jax.ShapeDtypeStruct)
    if recorded == bool(plan.num_extra):
        return
    if plan.num_extra:
        raise ValueError(
            "omgd: this optimizer state was written without extra traversal units, but units="
            f"{units!r} makes {plan.num_extra} ({', '.join(plan.extra_names)}); a state (or a "
            "checkpoint) cannot change the units of its traversal: start from tx.init(params), "
            "or resume with the configuration it was written with"
        )
    raise ValueError(
        "omgd: this optimizer state was written with extra traversal units (units=), but this "
        "transformation has none; resume with the configuration it was written with, or start "
        "from tx.init(params)"
    )


def masked_updates(schedule: MaskSchedule, updates, state: OmgdMaskState, mask_index=None):
    """Multiplies every leaf of ``updates`` by its mask factor at ``state.omgd_step``."""
    leaves, treedef = jax.tree.flatten(updates)
    plan = schedule.plan(updates)
    factors = schedule.factors(plan, leaves, state.omgd_key, state.omgd_step, mask_index)
    out = [
        jnp.zeros_like(u) if r == layers_lib.FROZEN else u if f is None else u * f
        for u, f, r in zip(leaves, factors, plan.roles, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def omgd_mask(
    num_masks: int | None = None,
    steps_per_mask: int = 1,
    *,
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
    r"""Masks the gradient with Omni-Masked Gradient Descent's traversal of disjoint masks.

    Every cycle draws a partition of the parameters into M disjoint groups and walks through
    them without replacement, each for ``steps_per_mask`` steps. With :math:`S_t` the mask of
    step t (value M on the active group, 0 elsewhere, when ``scale=True``),

    .. math::
        g_t = S_t \odot \nabla f(\theta_t), \qquad \sum_{j=1}^{M} S^{(j)} = M \cdot \mathbf{1},

    so over a cycle every coordinate is updated exactly once per mask pass; followed by
    ``optax.sgd`` this is Algorithm 1 (epochwise form) of the paper, with the O(eps^-3) rate.

    Layer granularity with ``units=``: a cycle is :math:`M = N_L/\gamma + E` phases in a
    random order drawn every cycle, :math:`N_L/\gamma` of them training :math:`\gamma` layers
    not yet visited in the cycle and one per extra unit training that unit alone; the sum
    above holds on every layer and every extra unit (factor M once per cycle). Always-active
    leaves keep factor 1; ``frozen=`` leaves get a zero gradient at every step.

    Placement matters when the next transformation has state. Before ``optax.adam`` (the usual
    chain) the inactive coordinates see g = 0: their moments decay and the parameters keep
    drifting on the old momentum. After it, with ``scale=False``, the update of inactive
    coordinates is zeroed, which freezes the parameters but not the moments. Neither saves
    memory: use :func:`omgd_jax.omgd` with ``state="compact"`` for that.

    Non-floating leaves pass through untouched, and so do ``None`` / ``optax.MaskedNode`` leaves.

    Args:
      num_masks: M, the number of disjoint masks of a cycle (keep ratio 1/M). For
        ``granularity="layer"`` it may be left None when ``layers_per_phase`` is given.
      steps_per_mask: K, optimizer steps each mask is held (one epoch of batches for the
        epochwise form; 100 for GPT-2 in the paper).
      key: PRNG key or int seed of the masks.
      granularity: ``"element"`` (every scalar a unit), ``"tensor"`` (every leaf a unit) or
        ``"layer"`` (LISA-wor: transformer layers are the units, the rest always active).
      traversal: ``"wor"`` (OMGD, without replacement) or ``"iid"`` (every phase's mask drawn
        independently; with ``granularity="layer"`` and ``scale=False`` this is plain LISA).
      scale: multiply kept entries by M (layer granularity: the middle layers by N_L / gamma).
      warmup_steps: full-gradient steps before masking starts (scale 1 during the warm-up).
        Phases count from step 0, so holds stay aligned with the loop's epochs; a warm-up
        that is a multiple of ``num_masks * steps_per_mask`` starts on a whole cycle.
      layers: for ``granularity="layer"``: a regex matched against each leaf's '/'-joined key
        path. With a capture group, the group is the layer number of unrolled layers
        (``r"h_(\d+)/"``); without, matching leaves are stacked layers with the layer axis
        first (``r"^blocks/"``, as ``nnx.scan``/``nnx.vmap`` make them). Or a callable
        ``(path, leaf) -> None | int | "stacked"``.
      layers_per_phase: gamma, the layers trained at once (layer granularity); M = N_L / gamma.
      layout: element granularity: ``"contiguous"`` bands in a random order (fast, and what
        the compact state of :func:`omgd` needs), ``"strided"`` (band j: rows j, j + M, ... of
        every leaf; the same bands on every mesh) or ``"random"`` (a hash partition).
      balance: tensor granularity: cut the permuted leaves by ``"count"`` or by ``"size"``.
      repartition: None (default): a fresh partition every cycle wherever the layout has
        one to draw (random layout, tensor and layer granularity; contiguous bands are fixed,
        their order redrawn every cycle); True: the same, refused for contiguous bands; False:
        one partition drawn once, its order reshuffled every cycle (the released code).
      units: layer granularity: leaves that are not layers and join the traversal as units of
        their own (embedding, head, final norm): a regex on the '/'-joined key path (no
        capture group: every matched leaf is its own unit; a capture group: leaves with the
        same captured text form one unit) or a callable ``(path, leaf) -> None | str`` (the
        unit's name). None (default): everything that is not a layer is always active.
        ``num_masks``, if given, is then the total M = N_L / gamma + E.
      frozen: layer granularity: leaves never trained (a regex or a callable
        ``(path, leaf) -> bool``): their gradient is zeroed at every step, warm-up included.

    Returns:
      An ``optax.GradientTransformationExtraArgs``. ``update`` accepts the extra argument
      ``mask_index``: the mask of this step when a loop drives Algorithm 1's joint (mask,
      batch) order (see :func:`omgd_jax.joint_traversal`); set ``steps_per_mask`` to the
      number of batches of an epoch so that a cycle is M epochs long.

    Examples:
      >>> import jax.numpy as jnp, optax, omgd_jax
      >>> tx = optax.chain(omgd_jax.omgd_mask(2, steps_per_mask=1), optax.sgd(1.0))
      >>> params = {"w": jnp.zeros(4)}
      >>> state = tx.init(params)
      >>> u1, state = tx.update({"w": jnp.ones(4)}, state, params)
      >>> u2, state = tx.update({"w": jnp.ones(4)}, state, params)
      >>> print(-(u1["w"] + u2["w"]))  # one cycle: every coordinate once, times M
      [2. 2. 2. 2.]

    References:
      Yang et al., Omni-Masked Gradient Descent, arXiv 2603.05960, 2026.
    """
    schedule = MaskSchedule.from_args(locals())
    check_key(key)  # validate now, create the array in init

    def init_fn(params):
        del params
        return init_mask_state(key)

    def update_fn(updates, state, params=None, *, mask_index=None, **extra_args):
        del params, extra_args
        updates = masked_updates(schedule, updates, state, mask_index)
        return updates, state._replace(omgd_step=optax.safe_increment(state.omgd_step))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
