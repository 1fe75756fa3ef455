"""Which leaves of a parameter tree are units of masking, and how.

A *plan* is the static description of a tree that the mask schedule needs: for every leaf its
role (masked unit, transformer layer, extra traversal unit, always active, never trained, or
passed through) and the number of transformer layers and of extra units. It is computed from
shapes and key paths only, so it works on concrete arrays, tracers and `jax.ShapeDtypeStruct`
alike, and is rebuilt at every trace for free.

Layer granularity reads three specs in one vocabulary (a regex searched in the '/'-joined key
path, or a callable ``(path, leaf)``): ``layers=`` (the transformer layers), ``units=`` (leaves
that join the traversal as units of their own: embedding, head, final norm) and ``frozen=``
(leaves never trained). A leaf may be picked by one of them at most; the leaves picked by none
are always active.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

# Roles of a leaf.
SKIP = "skip"  # not floating point: passed through untouched.
UNIT = "unit"  # element / tensor granularity: a masked leaf.
ALWAYS = "always"  # layer granularity: not part of a layer (embeddings, head, norms).
STACKED = "stacked"  # layer granularity: leading axis indexes the layers.
UNROLLED = "unrolled"  # layer granularity: the whole leaf belongs to one layer.
EXTRA = "extra"  # layer granularity: part of an extra traversal unit (``units=``).
FROZEN = "frozen"  # layer granularity: never trained (``frozen=``); update zero, no state.

LayerSpec = str | re.Pattern | Callable[[str, Any], "int | str | None"]
UnitSpec = str | re.Pattern | Callable[[str, Any], "str | None"]
FrozenSpec = str | re.Pattern | Callable[[str, Any], "bool | None"]


def path_str(path: tuple) -> str:
    """Joins a jax key path into 'a/b/0/c' (dict keys, attribute names, indices)."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def concrete(leaf):
    """Arrays as they are; a `jax.ShapeDtypeStruct` as zeros (so `init` works on shapes)."""
    return leaf if isinstance(leaf, jax.Array) else jnp.zeros(leaf.shape, leaf.dtype)


def is_float(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static facts about a tree, per leaf in `jax.tree.leaves` order.

    Attributes:
        roles: the role of every leaf (SKIP, UNIT, ALWAYS, STACKED, UNROLLED, EXTRA, FROZEN).
        layer_of: for UNROLLED leaves the layer index (0..num_layers-1), else -1.
        sizes: number of elements of every leaf.
        num_units: UNIT leaves (element/tensor) or layers (layer granularity).
        num_layers: number of transformer layers (0 unless layer granularity).
        unit_of: for EXTRA leaves the extra unit (0..num_extra-1), else -1.
        extra_names: the name of every extra unit, in unit order (first leaf first).
    """

    roles: tuple[str, ...]
    layer_of: tuple[int, ...]
    sizes: tuple[int, ...]
    num_units: int
    num_layers: int
    unit_of: tuple[int, ...] = ()
    extra_names: tuple[str, ...] = ()

    @property
    def num_extra(self) -> int:
        """E, the extra traversal units (``units=``); 0 without them."""
        return len(self.extra_names)

    @property
    def unit_leaves(self) -> tuple[int, ...]:
        """Indices of the leaves that are masked units (element / tensor granularity)."""
        return tuple(i for i, r in enumerate(self.roles) if r == UNIT)


def _size(leaf) -> int:
    n = 1
    for d in leaf.shape:
        n *= int(d)
    return n


def plan_units(tree) -> Plan:
    """Element and tensor granularity: every floating leaf is a unit."""
    leaves = jax.tree.leaves(tree)
    roles = tuple(UNIT if is_float(x) else SKIP for x in leaves)
    return Plan(
        roles=roles,
        layer_of=(-1,) * len(leaves),
        sizes=tuple(_size(x) for x in leaves),
        num_units=sum(r == UNIT for r in roles),
        num_layers=0,
    )


def _classify(layers: LayerSpec, path: str, leaf) -> int | str | None:
    """None: not a layer; 'stacked': leading layer axis; int: unrolled layer id."""
    if callable(layers) and not isinstance(layers, re.Pattern):
        out = layers(path, leaf)
        if out is not None and out != STACKED and not isinstance(out, int):
            raise TypeError(
                f"layers: the callable must return None, an int layer id or 'stacked', got {out!r} "
                f"for leaf {path!r}"
            )
        return out
    pattern = re.compile(layers) if isinstance(layers, str) else layers
    match = pattern.search(path)
    if match is None:
        return None
    if pattern.groups == 0:
        return STACKED
    try:
        return int(match.group(1))
    except (TypeError, ValueError):
        raise ValueError(
            f"layers: the first capture group of {pattern.pattern!r} must be a layer number, "
            f"got {match.group(1)!r} in {path!r}"
        ) from None


def plan_layers(
    tree, layers: LayerSpec, units: UnitSpec | None = None, frozen: FrozenSpec | None = None
) -> Plan:
    """Layer granularity: stacked or unrolled transformer layers, the extra units of
    ``units``, the never-trained leaves of ``frozen``, everything else always on."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    roles, layer_of, sizes, stacked_depths, unrolled_ids = [], [], [], set(), set()
    unit_names, unit_of = [], []
    for path, leaf in flat:
        sizes.append(_size(leaf))
        kind = _classify(layers, path_str(path), leaf) if is_float(leaf) else None
        name, fixed = _extra_roles(units, frozen, kind, path_str(path), leaf)
        if name is not None:
            if name not in unit_names:
                unit_names.append(name)
            roles.append(EXTRA)
            layer_of.append(-1)
            unit_of.append(unit_names.index(name))
            continue
        unit_of.append(-1)
        if fixed:
            roles.append(FROZEN)
            layer_of.append(-1)
        elif not is_float(leaf):
            roles.append(SKIP)
            layer_of.append(-1)
        elif kind is None:
            roles.append(ALWAYS)
            layer_of.append(-1)
        elif kind == STACKED:
            if len(leaf.shape) == 0:
                raise ValueError(
                    f"layers: leaf {path_str(path)!r} was selected as stacked layers but is "
                    "a scalar; stacked leaves need a leading layer axis"
                )
            roles.append(STACKED)
            layer_of.append(-1)
            stacked_depths.add(int(leaf.shape[0]))
        else:
            roles.append(UNROLLED)
            layer_of.append(int(kind))
            unrolled_ids.add(int(kind))
    if not stacked_depths and not unrolled_ids:
        raise ValueError(
            f"layers={layers!r} selects no floating-point leaf of the tree; paths look like "
            f"{[path_str(p) for p, _ in flat[:4]]}"
        )
    for spec, name, role in ((units, "units", EXTRA), (frozen, "frozen", FROZEN)):
        if spec is not None and role not in roles:
            raise ValueError(
                f"{name}={spec!r} selects no floating-point leaf of the tree; paths look like "
                f"{[path_str(p) for p, _ in flat[:4]]}"
            )
    if stacked_depths and unrolled_ids:
        raise ValueError("layers: mixes stacked leaves and unrolled layers; use one or the other")
    if len(stacked_depths) > 1:
        raise ValueError(
            f"layers: stacked leaves disagree on the number of layers (leading axes "
            f"{sorted(stacked_depths)})"
        )
    if unrolled_ids:
        # Renumber the captured ids 0..N-1 in sorted order.
        index = {lid: i for i, lid in enumerate(sorted(unrolled_ids))}
        layer_of = [index[lid] if lid >= 0 else -1 for lid in layer_of]
        num_layers = len(index)
    else:
        num_layers = stacked_depths.pop()
    return Plan(
        tuple(roles),
        tuple(layer_of),
        tuple(sizes),
        num_layers,
        num_layers,
        tuple(unit_of) if unit_names else (),
        tuple(unit_names),
    )


def _matches(spec, path: str, leaf) -> tuple[bool, Any]:
    """(selected, what the spec said): a callable's value, or a regex match object."""
    if callable(spec) and not isinstance(spec, re.Pattern):
        out = spec(path, leaf)
        return out is not None and out is not False, out
    pattern = re.compile(spec) if isinstance(spec, str) else spec
    match = pattern.search(path)
    return match is not None, match


def _unit_name(units: UnitSpec, path: str, said) -> str:
    """The extra unit of a leaf selected by ``units``: its own path, the captured text, or the
    callable's name."""
    if isinstance(said, re.Match):
        if said.re.groups == 0:
            return path
        if said.group(1) is None:
            raise ValueError(
                f"units: the first capture group of {said.re.pattern!r} took no part in the "
                f"match of {path!r}; it names the unit, so it must match"
            )
        return said.group(1)
    if not isinstance(said, str):
        raise TypeError(
            f"units: the callable must return None or a unit name (a str), got {said!r} for leaf "
            f"{path!r}"
        )
    return said


def _extra_roles(units, frozen, kind, path: str, leaf) -> tuple[str | None, bool]:
    """(extra unit name or None, frozen?) of one leaf; a leaf picked twice is an error."""
    if not is_float(leaf) or (units is None and frozen is None):
        return None, False
    picked = ["layers"] if kind is not None else []
    name, fixed = None, False
    if units is not None:
        selected, said = _matches(units, path, leaf)
        if selected:
            picked.append("units")
            name = _unit_name(units, path, said)
    if frozen is not None and _matches(frozen, path, leaf)[0]:
        picked.append("frozen")
        fixed = True
    if len(picked) > 1:
        raise ValueError(
            f"leaf {path!r} is selected by both {picked[0]}= and {picked[1]}=; a leaf is a "
            "layer, an extra unit (units=), never trained (frozen=) or, picked by none of them, "
            "always active: make the specs disjoint"
        )
    return name, fixed


# ------------------------------------------------------------------ MaskedNode inside wrappers
def _is_wrapped_masked_node(x) -> bool:
    """A non-container pytree node (e.g. `nnx.Param`) whose only content is a MaskedNode."""
    if isinstance(x, (dict, list, tuple, optax.MaskedNode)) or x is None:
        return False
    if hasattr(x, "keys") and hasattr(x, "items"):  # mappings such as nnx.State
        return False
    children = jax.tree_util.tree_flatten(x, is_leaf=lambda y: isinstance(y, optax.MaskedNode))[0]
    return len(children) == 1 and isinstance(children[0], optax.MaskedNode) and children[0] is not x


def bare_masked_nodes(tree):
    """``tree`` with every wrapper around a MaskedNode (``nnx.Param(MaskedNode())``, which
    `optax.masked` / `optax.partition` make of `nnx.State` parameters) replaced by the bare
    MaskedNode. Same leaves, in the same order."""
    return jax.tree.map(
        lambda x: optax.MaskedNode() if _is_wrapped_masked_node(x) else x,
        tree,
        is_leaf=_is_wrapped_masked_node,
    )


def with_bare_masked_nodes(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """``inner`` whose state holds bare MaskedNodes instead of wrappers around them.

    A wrapper around a MaskedNode has no shape, so `nnx.eval_shape(lambda: nnx.Optimizer(...))`
    cannot give it a sharding under a mesh (flax raises a TypeError). The wrappers are put back,
    from the structure of ``inner.init``, before ``inner.update`` sees its state. Plain pytrees
    of arrays hold no such wrappers: their state is unchanged.
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return bare_masked_nodes(inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        template = jax.eval_shape(inner.init, updates if params is None else params)
        full = jax.tree.unflatten(jax.tree.structure(template), jax.tree.leaves(state))
        new_updates, new_state = inner.update(updates, full, params, **extra_args)
        return new_updates, bare_masked_nodes(new_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
