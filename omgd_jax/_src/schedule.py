"""The mask schedule: which coordinates are active at a step, as a pure function of (key, step).

OMGD (arXiv 2603.05960, Algorithm 1 and Fig. 1) splits training into *cycles*. At the start of
cycle k the coordinates are partitioned into M disjoint groups; the cycle then walks through the
M groups, without replacement, each held for K = ``steps_per_mask`` optimizer steps, so every
coordinate is active exactly once per cycle and the masks satisfy the coverage requirement

    sum_j S^(j) = M * 1   (S^(j) = M on group j, 0 elsewhere).

Everything here is computed inside `jit` from the PRNG key and the step counter with
`jax.random.fold_in(key, cycle)`: nothing lives on the host, so masks are checkpointable and
identical on every host of a pod.

Granularities (SPEC §1.2):
  * ``"element"``: each scalar is a unit. ``layout="contiguous"`` (default) cuts every leaf's
    flattened coordinates into M contiguous bands of ceil(n/M) (the last one shorter) and walks
    through them in a random order, drawn afresh every cycle: balanced, two integer compares
    that XLA fuses into the update, and the active share of a leaf is one window, which is what
    lets `omgd` keep a compact optimizer state with `dynamic_slice` (SPEC §5). The bands
    themselves are the same every cycle (``repartition=True`` is refused for them): a random
    rotation would make one band wrap around the end of the leaf, and writing a wrapped window
    back costs several times the update on CPU.
    ``layout="strided"`` makes band j the rows j, j + M, j + 2M, ... of every leaf's leading
    axis: also fixed, and local to every shard of a leaf sharded along its rows into blocks of a
    multiple of M rows (FSDP), so `omgd`'s compact state trains the same bands on every mesh.
    ``layout="random"`` assigns every coordinate to a uniformly random group with a
    counter-based hash, afresh every cycle: the fine-grained random partition of the theory,
    for small problems and for `omgd_mask` (groups balanced in expectation only).
  * ``"tensor"``: each floating leaf is a unit; a random permutation of the leaves is cut into M
    groups of equal count (``balance="count"``) or of about equal element count (``"size"``).
  * ``"layer"``: LISA-wor (Algorithm 2). The N_L transformer layers are permuted and cut into
    G = N_L / gamma groups of gamma layers; everything that is not a layer is always active,
    scale 1 (the paper's default, and the default here).

Units beyond the layers (SPEC §6). ``units=`` (layer granularity; same vocabulary as
``layers=``: a regex on the '/'-joined key path, each matched leaf its own unit, or with a
capture group, leaves with the same captured text one unit; or a callable
``(path, leaf) -> None | str`` naming the unit) makes E extra units (embedding, head, final
norm) join the traversal. A cycle then has

    M = G + E = N_L / gamma + E

phases: the M phase labels 0..M-1 are permuted afresh every cycle; label l < G trains the
gamma layers of group l of the cycle's layer partition, label G + e trains extra unit e alone.
Every trainable unit (layer or extra) is active in exactly one phase of the cycle and scaled
by M there (``scale=True``; 1 with ``scale=False``), so with S^(j) the factors of phase j

    sum_{j=1}^{M} S^(j) = M * 1   on every layer and every extra unit,

the coverage of Algorithm 1 over the trainable units. Leaves picked by neither ``layers=``,
``units=`` nor ``frozen=`` stay always active with factor 1 at every step (outside the
condition, as the paper's always-on embedding and head); ``frozen=`` leaves are never trained
(factor 0 at every step, warm-up included). ``num_masks``, if given, is the total M (so M - E
must divide N_L); ``layers_per_phase`` gives gamma and M = N_L / gamma + E. With E = 0 this is
Algorithm 2 as before, bit for bit. `Active.unit` says which kind of phase a step is in: the
extra unit (0..E-1) it trains, or -1 in a layers phase; `Active.layer_ids` is always gamma
valid layer ids (so shapes do not depend on the phase), not trained while ``unit >= 0``.

``traversal="iid"`` draws every phase's mask independently (one group of a fresh partition drawn
from ``fold_in(key, phase)``): the same law per phase as ``"wor"``, but no coverage per cycle.
With extra units every phase draws its label uniformly from the M labels, so every layer and
every extra unit is active in a phase with probability 1/M, independently across phases.

`MaskSchedule.active` is the one place that turns (key, step) into what is active (phase, label,
layer ids, factor); the dense masks of `omgd_mask` and the compact and frozen states read it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp

from omgd_jax._src import layers as layers_lib

Granularity = Literal["element", "tensor", "layer"]
Traversal = Literal["wor", "iid"]
Layout = Literal["contiguous", "strided", "random"]
Balance = Literal["count", "size"]
GRANULARITIES = get_args(Granularity)
TRAVERSALS = get_args(Traversal)
LAYOUTS = get_args(Layout)
BALANCES = get_args(Balance)

# Salts that separate the random streams derived from one key.
_PARTITION, _ORDER, _PICK = 0, 1, 2


class Phase(NamedTuple):
    """Where a step falls in the traversal (all traced int32 / bool scalars)."""

    masked: jax.Array  # False during the full-gradient warm-up.
    cycle: jax.Array  # index of the cycle (wor) or of the phase (iid).
    group: jax.Array  # which of the M groups of the cycle's partition is active.
    phase_id: jax.Array  # changes exactly when the active group changes; -1 in warm-up.


class Active(NamedTuple):
    """What is active at one step: everything a masked update needs, from `MaskSchedule.active`.

    ``num_masks`` and ``factor`` are Python numbers (static under `jit`); the rest are traced.
    """

    num_masks: int  # M for this tree (layer granularity: N_L / gamma + E).
    phase: Phase  # where the step falls: warm-up or not, cycle, group, phase id.
    partition_key: jax.Array  # key of this cycle's partition (hash seeds, tensor labels, layers).
    label: jax.Array  # int32, the partition label (0..M-1) that is active.
    layer_ids: jax.Array | None  # layer granularity: int32[gamma], the active layers; else None.
    factor: float  # value of a kept entry once masking starts: M if scale, else 1.
    unit: jax.Array | None = None  # layer granularity: int32, the extra unit (0..E-1) this
    # phase trains, -1 in a layers phase (always -1 without units=); else None.


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, jax.Array):  # a tracer, or inject_hyperparams' arrays
        raise TypeError(
            f"{name} must be a Python int >= {minimum}, got an array ({value!r}): it shapes "
            "the computation and cannot be a hyperparameter; with optax.inject_hyperparams pass "
            "static_args=omgd_jax.static_args(factory) (factory: the function you inject)"
        )
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_key(key) -> None:
    """Raises unless ``key`` is an int seed, a typed PRNG key or a raw uint32[2] key."""
    is_int = isinstance(key, int) and not isinstance(key, bool)
    is_typed = hasattr(key, "dtype") and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    is_raw = getattr(key, "shape", None) == (2,) and getattr(key, "dtype", None) == "uint32"
    if not (is_int or (is_typed and key.shape == ()) or is_raw):
        raise TypeError(f"key must be an int seed or a single jax PRNG key, got {key!r}")


def canonical_key(key: jax.Array | int) -> jax.Array:
    """`jax.random.key(key)` for an int, a typed key as it is, a raw uint32[2] key wrapped."""
    check_key(key)
    if isinstance(key, int):
        return jax.random.key(key)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


@dataclasses.dataclass(frozen=True)
class MaskSchedule:
    """Validated OMGD mask configuration; see the module docstring for the meaning.

    The fields are the mask arguments of `omgd_mask`, `omgd` and `omgd_adamw`, with the same
    names and defaults (a test keeps them equal); those factories build their schedule with
    `MaskSchedule.from_args`. ``num_masks`` may be None only for layer granularity with
    ``layers_per_phase`` given, in which case M = N_L / gamma + E is fixed when the tree is
    seen (E: the extra units of ``units=``, 0 without them; ``frozen=`` leaves are never
    trained; see the module docstring).

    Everything a step needs comes from `active`: (phase, active label, active layer ids,
    factor) as a pure function of (key, step), usable inside `jit`.
    """

    num_masks: int | None = None
    steps_per_mask: int = 1
    granularity: Granularity = "element"
    traversal: Traversal = "wor"
    scale: bool = True
    warmup_steps: int = 0
    layers: layers_lib.LayerSpec | None = None
    layers_per_phase: int | None = None
    layout: Layout = "contiguous"
    balance: Balance = "count"
    repartition: bool | None = None
    units: layers_lib.UnitSpec | None = None
    frozen: layers_lib.FrozenSpec | None = None

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> MaskSchedule:
        """The schedule named by a factory's arguments (e.g. its ``locals()``), by keyword.

        Picks every field of `MaskSchedule` out of ``args`` by name and ignores the rest, so a
        factory passes its arguments without repeating them and without relying on order.
        """
        return cls(**{f.name: args[f.name] for f in dataclasses.fields(cls)})

    def __post_init__(self):
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_choice("traversal", self.traversal, TRAVERSALS)
        check_choice("layout", self.layout, LAYOUTS)
        check_choice("balance", self.balance, BALANCES)
        check_int("steps_per_mask", self.steps_per_mask, 1)
        check_int("warmup_steps", self.warmup_steps, 0)
        for flag in ("scale", "repartition"):
            value = getattr(self, flag)
            if not isinstance(value, bool) and not (flag == "repartition" and value is None):
                raise TypeError(f"{flag} must be a bool, got {value!r}")
        fixed = self.layout in ("contiguous", "strided")
        if self.repartition and self.granularity == "element" and fixed:
            raise ValueError(
                f"repartition=True needs a partition to redraw, and layout={self.layout!r} has "
                "fixed bands (only their order is redrawn every cycle): use layout='random' for a "
                "fresh partition every cycle, or leave repartition unset (None)"
            )
        if self.layers_per_phase is not None:
            if self.granularity != "layer":
                raise ValueError("layers_per_phase is only used with granularity='layer'")
            check_int("layers_per_phase", self.layers_per_phase, 1)
        if self.num_masks is None:
            if self.layers_per_phase is None:
                raise ValueError(
                    "num_masks is required (an int >= 1); with granularity='layer' you may give "
                    "layers_per_phase instead"
                )
        else:
            check_int("num_masks", self.num_masks, 1)
        if self.granularity == "layer":
            if self.layers is None:
                raise ValueError(
                    "granularity='layer' needs layers=: a regex on the '/'-joined key path "
                    "(r'^blocks/' for stacked layers, r'h_(\\d+)/' for unrolled ones) or a "
                    "callable (path, leaf) -> None | int | 'stacked'"
                )
            if not (isinstance(self.layers, str) or callable(self.layers)) and not hasattr(
                self.layers, "pattern"
            ):
                raise TypeError(f"layers must be a regex string or a callable, got {self.layers!r}")
            if self.num_masks is not None and self.layers_per_phase is not None:
                raise ValueError(
                    "give num_masks or layers_per_phase for granularity='layer', not both"
                )
        elif self.layers is not None:
            raise ValueError("layers= is only used with granularity='layer'")
        for name in ("units", "frozen"):
            spec = getattr(self, name)
            if spec is None:
                continue
            if self.granularity != "layer":
                raise ValueError(
                    f"{name}= is only used with granularity='layer' (extra traversal units and "
                    f"never-trained leaves beside the layers), got granularity="
                    f"{self.granularity!r}"
                )
            if not (isinstance(spec, str) or callable(spec) or hasattr(spec, "pattern")):
                raise TypeError(
                    f"{name} must be a regex string or a callable (path, leaf), got {spec!r}"
                )

    # ----------------------------------------------------------------------------------- plan
    def plan(self, tree) -> layers_lib.Plan:
        """Static roles of the leaves of ``tree``; checks the layer count against M."""
        if self.granularity != "layer":
            return layers_lib.plan_units(tree)
        plan = layers_lib.plan_layers(tree, self.layers, self.units, self.frozen)
        self.masks_for(plan)  # validates
        return plan

    def masks_for(self, plan: layers_lib.Plan) -> int:
        """M for this tree (layer granularity: N_L / gamma + E when gamma is given)."""
        if self.granularity != "layer":
            return self.num_masks
        n, extra = plan.num_layers, plan.num_extra
        if self.layers_per_phase is not None:
            if self.layers_per_phase > n:
                raise ValueError(
                    f"layers_per_phase={self.layers_per_phase} is larger than the number of "
                    f"layers ({n})"
                )
            if n % self.layers_per_phase:
                raise ValueError(
                    f"layers_per_phase={self.layers_per_phase} must divide the number of "
                    f"layers ({n})"
                )
            return n // self.layers_per_phase + extra
        if extra:
            return self._masks_with_units(n, extra)
        if self.num_masks > n:
            raise ValueError(
                f"num_masks={self.num_masks} is larger than the number of layers ({n})"
            )
        if n % self.num_masks:
            raise ValueError(
                f"num_masks={self.num_masks} must divide the number of layers ({n}) so that every "
                "phase trains the same number of layers"
            )
        return self.num_masks

    def _masks_with_units(self, n: int, extra: int) -> int:
        """``num_masks`` = M = G + E, checked: G = M - E layer phases must divide N_L."""
        groups = self.num_masks - extra
        if groups < 1:
            raise ValueError(
                f"num_masks={self.num_masks} is the total number of phases M = N_L / gamma + E "
                f"and must be larger than the {extra} extra units of units= (at least one "
                "layers phase); or give layers_per_phase instead"
            )
        if n % groups:
            raise ValueError(
                f"num_masks={self.num_masks} minus the {extra} extra units of units= leaves "
                f"{groups} layer phases, which must divide the number of layers ({n}) so that "
                "every layers phase trains the same number of layers"
            )
        return self.num_masks

    def layer_groups(self, plan: layers_lib.Plan) -> int:
        """G = M - E, the phases of a cycle that train layers (layer granularity)."""
        return self.masks_for(plan) - plan.num_extra

    # ---------------------------------------------------------------------------------- phase
    def phase(self, step: jax.Array, num_masks: int, mask_index: jax.Array | None = None) -> Phase:
        """Cycle and group of optimizer step ``step`` (0-based, traced)."""
        step = jnp.asarray(step, jnp.int32)
        masked = step >= self.warmup_steps
        # Phases count from step 0, not from the end of the warm-up, so a mask held for an
        # epoch of batches stays aligned with the epochs (the paper's ``masks[t // n]``).
        period = step // self.steps_per_mask
        if self.traversal == "iid":
            if mask_index is not None:
                raise ValueError("mask_index is only meaningful with traversal='wor'")
            cycle, group = period, jnp.int32(0)  # the group is drawn in `_groups`.
            phase_id = period
        else:
            cycle = period // num_masks
            group = period % num_masks if mask_index is None else jnp.asarray(mask_index, jnp.int32)
            phase_id = cycle * num_masks + group
        return Phase(masked, cycle, group, jnp.where(masked, phase_id, -1))

    def keys(self, key: jax.Array, phase: Phase) -> tuple[jax.Array, jax.Array]:
        """(partition key, key of the label that is active) for this phase."""
        cycle_key = jax.random.fold_in(key, phase.cycle)
        partition_key = key if self.repartition is False else cycle_key
        return (
            jax.random.fold_in(partition_key, _PARTITION),
            jax.random.fold_in(cycle_key, _ORDER),
        )

    def active_label(self, key: jax.Array, phase: Phase, num_masks: int) -> jax.Array:
        """The partition label (0..M-1) active in this phase.

        wor: a random order of the M labels per cycle, walked through by ``phase.group``.
        iid: a uniformly random label, independently for every phase.
        """
        _, order_key = self.keys(key, phase)
        if self.traversal == "iid":
            return jax.random.randint(jax.random.fold_in(order_key, _PICK), (), 0, num_masks)
        return jax.random.permutation(order_key, num_masks)[phase.group]

    # --------------------------------------------------------------------- per-granularity maths
    @staticmethod
    def band(n: int, label: jax.Array, num_masks: int) -> tuple[jax.Array, int]:
        """Element/contiguous: (start, c) of band ``label`` of a leaf of ``n`` coordinates.

        Bands are [t c, (t + 1) c) with c = ceil(n / M): the (M, c) view of the flattened
        leaf, the last band cut short at n.
        """
        c = -(-n // num_masks)
        return label * c, c

    @staticmethod
    def strided_rows(shape: tuple[int, ...], label: jax.Array, num_masks: int) -> jax.Array:
        """Element/strided: band ``label`` is rows ``label, label + M, label + 2M, ...`` of the
        leading axis (a scalar leaf is row 0), as a mask broadcastable to ``shape``.

        Which rows a shard holds does not change which band a row is in, so a leaf sharded
        along its rows into shards of a multiple of M rows cuts the same bands on every mesh.
        """
        if not shape:
            return label == 0
        rows = jnp.arange(shape[0], dtype=jnp.int32) % num_masks == label
        return rows.reshape((shape[0],) + (1,) * (len(shape) - 1))

    def hash_seed(self, key: jax.Array, leaf_index: int) -> jax.Array:
        """Element/random: the per-leaf uint32 seed of the hash partition."""
        return jax.random.bits(jax.random.fold_in(key, leaf_index), (), jnp.uint32)

    def tensor_labels(self, key: jax.Array, plan: layers_lib.Plan, num_masks: int) -> jax.Array:
        """Tensor granularity: the partition label of every unit leaf (int32[num_units])."""
        num = plan.num_units
        order = jax.random.permutation(key, num)  # order[q] = unit at position q
        if self.balance == "count":
            rank = jnp.zeros(num, jnp.int32).at[order].set(jnp.arange(num, dtype=jnp.int32))
            return rank * num_masks // num
        sizes = jnp.asarray([plan.sizes[i] for i in plan.unit_leaves], jnp.float32)
        sorted_sizes = sizes[order]
        middle = jnp.cumsum(sorted_sizes) - 0.5 * sorted_sizes  # centre of each unit on the line
        label_sorted = jnp.minimum(
            (num_masks * middle / jnp.sum(sizes)).astype(jnp.int32), num_masks - 1
        )
        return jnp.zeros(num, jnp.int32).at[order].set(label_sorted)

    def layer_ids(self, key: jax.Array, num_layers: int, label: jax.Array, num_masks: int):
        """Layer granularity: the gamma = N_L / G layer indices of group ``label``.

        ``num_masks`` is G, the layer groups of a cycle (M without extra units).
        """
        gamma = num_layers // num_masks
        perm = jax.random.permutation(key, num_layers)
        return jax.lax.dynamic_slice_in_dim(perm, label * gamma, gamma)

    # ------------------------------------------------------------------------------ one step
    def active(
        self,
        plan: layers_lib.Plan,
        key: jax.Array,
        step: jax.Array,
        mask_index: jax.Array | None = None,
    ) -> Active:
        """What is active at optimizer step ``step`` (0-based) for a tree with plan ``plan``.

        A pure function of (key, step), traceable under `jit`, and the one place that turns a
        step into a mask: the dense factors (`factors`), the compact state and the frozen state
        all read it. For layer granularity ``layer_ids`` are the gamma active layers (indices
        along the stacked axis, or renumbered unrolled layers); only ``plan.num_layers`` and
        the roles of ``plan`` are used, so ``schedule.plan(params)`` of any tree with the same
        layers will do.

        Args:
          plan: ``self.plan(tree)``.
          key: the typed PRNG key of the masks (``OmgdMaskState.omgd_key``).
          step: int32 scalar, optimizer steps taken before this one.
          mask_index: Algorithm 1's joint order: the mask of the cycle to use (wor only).

        Returns:
          An `Active` tuple.

        Examples:
          >>> import jax, jax.numpy as jnp
          >>> from omgd_jax._src.schedule import MaskSchedule
          >>> schedule = MaskSchedule(
          ...     granularity="layer", layers=r"^blocks/", layers_per_phase=2, steps_per_mask=5
          ... )
          >>> plan = schedule.plan({"blocks": {"w": jnp.zeros((6, 3))}, "head": jnp.zeros(3)})
          >>> cycle = [schedule.active(plan, jax.random.key(0), 5 * j) for j in range(3)]
          >>> sorted(int(i) for a in cycle for i in a.layer_ids)  # every layer once per cycle
          [0, 1, 2, 3, 4, 5]
          >>> cycle[0].num_masks, cycle[0].factor
          (3, 3.0)
        """
        num_masks = self.masks_for(plan)
        phase = self.phase(step, num_masks, mask_index)
        partition_key, _ = self.keys(key, phase)
        label = self.active_label(key, phase, num_masks)
        layer_ids = unit = None
        if self.granularity == "layer":
            groups, group, unit = num_masks - plan.num_extra, label, jnp.int32(-1)
            if plan.num_extra:  # labels G.. are the extra units; their phases train no layer
                group = jnp.where(label < groups, label, 0)
                unit = jnp.where(label < groups, -1, label - groups).astype(jnp.int32)
            layer_ids = self.layer_ids(partition_key, plan.num_layers, group, groups)
        factor = float(num_masks) if self.scale else 1.0
        return Active(num_masks, phase, partition_key, label, layer_ids, factor, unit)

    # ------------------------------------------------------------------------------ dense masks
    def factors(
        self,
        plan: layers_lib.Plan,
        leaves: list,
        key: jax.Array,
        step: jax.Array,
        mask_index: jax.Array | None = None,
    ) -> list[jax.Array | None]:
        """Per leaf, the factor to multiply its gradient by: M (or 1) where active, 0 elsewhere.

        Factors broadcast against their leaf: full-shape for element granularity, a scalar per
        tensor, shape (N_L, 1, ..., 1) for stacked layers. None marks leaves passed through
        untouched (non-floating leaves, and always-active leaves of layer granularity).
        During the warm-up every factor is 1, except that of a ``frozen=`` leaf: 0 at every step.
        """
        active = self.active(plan, key, step, mask_index)
        out = []
        activity = self._activity(plan, leaves, active)
        for leaf, on, role in zip(leaves, activity, plan.roles, strict=True):
            if role == layers_lib.FROZEN:
                out.append(jnp.zeros((), leaf.dtype))
            elif on is None:
                out.append(None)
            else:
                value = jnp.where(on, active.factor, 0.0).astype(leaf.dtype)
                out.append(jnp.where(active.phase.masked, value, jnp.ones((), leaf.dtype)))
        return out

    def _activity(self, plan, leaves, active: Active) -> list[jax.Array | None]:
        """Per leaf, a boolean (broadcastable) activity array, or None for 'untouched'."""
        roles = plan.roles
        key, label, num_masks = active.partition_key, active.label, active.num_masks
        out: list[jax.Array | None] = [None] * len(leaves)
        if self.granularity == "element":
            for i in plan.unit_leaves:
                leaf = leaves[i]
                n = plan.sizes[i]
                if self.layout == "contiguous":
                    start, c = self.band(n, label, num_masks)
                    # Bands are whole blocks of the trailing axes whenever those divide c (GPT-2:
                    # rows of a matrix, layers of a stacked leaf): decide per block and let the
                    # factor broadcast, which keeps integer work out of the per-element loop.
                    lead, block = leaf.ndim, 1
                    while lead > 0 and c and c % (block * leaf.shape[lead - 1]) == 0:
                        block *= leaf.shape[lead - 1]
                        lead -= 1
                    first = jnp.arange(0, n, block, dtype=jnp.int32)
                    on = (first >= start) & (first < start + c)
                    out[i] = on.reshape(leaf.shape[:lead] + (1,) * (leaf.ndim - lead))
                elif self.layout == "strided":
                    out[i] = self.strided_rows(leaf.shape, label, num_masks)
                else:
                    e = jnp.arange(n, dtype=jnp.int32).reshape(leaf.shape)
                    h = mix32(e.astype(jnp.uint32) ^ self.hash_seed(key, i))
                    out[i] = (h % jnp.uint32(num_masks)).astype(jnp.int32) == label
        elif self.granularity == "tensor":
            labels = self.tensor_labels(key, plan, num_masks)
            for u, i in enumerate(plan.unit_leaves):
                out[i] = labels[u] == label
        else:
            on = jnp.zeros(plan.num_layers, bool).at[active.layer_ids].set(True)
            if plan.num_extra:  # a unit phase trains no layer
                on = on & (active.unit < 0)
            for i, role in enumerate(roles):
                if role == layers_lib.STACKED:
                    out[i] = on.reshape((-1,) + (1,) * (leaves[i].ndim - 1))
                elif role == layers_lib.UNROLLED:
                    out[i] = on[plan.layer_of[i]]
                elif role == layers_lib.EXTRA:
                    out[i] = active.unit == plan.unit_of[i]
        return out


def mix32(x: jax.Array) -> jax.Array:
    """A bijective uint32 mixing function (Wellons' lowbias32): a cheap counter-based hash.

    jax.random would also do, but threefry over every coordinate at every step costs more than
    the optimizer update itself on CPU; this is five integer ops that fuse into the update.
    """
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)
