"""Which leaves of a parameter tree are weight matrices, for optimizers that act per matrix.

SkipUpdate/Magma mask whole blocks and MoFaSGD factors the momentum of matrices; both pick the
leaves with one *rule*, a regex, a callable or the default below, and read a 3-D leaf of a
stacked layer tree as N_L matrices (one per index of its leading axis).

* default (:func:`default_rule`): never a leaf whose path has a component containing ``emb``
  or equal to ``wte``, ``wpe``, ``head``, ``lm_head`` or ``unembed`` (embeddings, output head).
  Under a *stacked* layer path (a component ``blocks``, ``block``, ``layers``, ``layer`` or
  ``h`` not followed by an integer index, as ``nnx.vmap``/``nnx.scan`` make them) every 3-D
  floating leaf, a stack of matrices with the layer axis first; its 2-D ``(N_L, d)`` leaves are
  biases and norms, not selected. Anywhere else (unrolled layers such as ``h/0/...`` included)
  every 2-D floating leaf. Nothing else (biases, norms, scalars, conv kernels). On the GPT-2
  example this selects the four kernels of ``blocks/attn`` and ``blocks/mlp`` and nothing
  else; on a plain dict of matrices, every matrix.
* a regex searched in the '/'-joined key path: matching floating leaves are selected; a 3-D match
  is a stack of layers (one block per index of axis 0), any other rank is one block.
* a callable ``(path, leaf) -> bool | "stacked"``: False/None not selected, True one block,
  "stacked" one block per index of the leading axis.

A trailing ``/value`` (flax NNX ``Variable`` leaves, as ``nnx.Optimizer`` passes to ``init``)
is dropped from paths, so the same rule holds in ``init`` and ``update``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax

from omgd_jax._src.layers import is_float, path_str

Rule = str | re.Pattern | Callable[[str, Any], "bool | str | None"]
TENSOR, STACKED = "tensor", "stacked"

_EMBEDDING_OR_HEAD = re.compile(r"emb|^(wte|wpe|head|lm_head|unembed)$", re.IGNORECASE)
_LAYER_LIKE = re.compile(r"^(blocks?|layers?|h)$")


def default_rule(path: str, leaf) -> bool | str:
    """The default rule: 2-D weights outside embeddings and head, stacked 3-D ones in layers."""
    parts = path.split("/")
    if any(_EMBEDDING_OR_HEAD.search(p) for p in parts):
        return False
    stacked = any(
        _LAYER_LIKE.match(p) and not (i + 1 < len(parts) and parts[i + 1].isdigit())
        for i, p in enumerate(parts[:-1])
    )
    if stacked:  # leading layer axis: matrices are 3-D, (L, d) leaves are biases and norms
        return STACKED if leaf.ndim == 3 else False
    return leaf.ndim == 2


def leaf_path(path: tuple) -> str:
    """'/'-joined key path without a trailing NNX ``value`` attribute."""
    if path and getattr(path[-1], "name", None) == "value":
        path = path[:-1]
    return path_str(path)


def check_rule(name: str, rule) -> None:
    if rule is None or isinstance(rule, str | re.Pattern) or callable(rule):
        return
    raise TypeError(f"{name} must be None, a regex or a callable (path, leaf), got {rule!r}")


def leaf_kinds(tree, rule: Rule | None = None, name: str = "rule") -> list[str | None]:
    """Per leaf (``jax.tree.leaves`` order): None (not selected), TENSOR or STACKED."""
    rule = default_rule if rule is None else rule
    if isinstance(rule, str | re.Pattern):
        pattern = re.compile(rule)
        rule = lambda path, leaf: (
            bool(pattern.search(path)) and (STACKED if leaf.ndim == 3 else True)
        )
    kinds = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        kind = rule(leaf_path(path), leaf) if is_float(leaf) else False
        if kind == STACKED:
            if leaf.ndim < 1:
                raise ValueError(f"{name}: {leaf_path(path)!r} is a scalar, it cannot be stacked")
            kinds.append(STACKED)
        elif kind is True:
            kinds.append(TENSOR)
        elif kind is False or kind is None:
            kinds.append(None)
        else:
            raise TypeError(
                f"{name}: the callable must return a bool or 'stacked', got {kind!r} for "
                f"{leaf_path(path)!r}"
            )
    return kinds
