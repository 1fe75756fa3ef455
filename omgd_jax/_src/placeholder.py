"""What ``init`` sees and returns under `optax.tree.map_params`, in one place.

`optax.tree.map_params` calls ``init`` with one opaque placeholder instead of the parameters, so
that it can tell params-shaped state from the rest; state that is not params-shaped is then
returned as `NotParams` leaves.
"""

from __future__ import annotations

from typing import Any

import optax


def _params_placeholder_type() -> type:
    """The type of the stand-in that `optax.tree.map_params` hands to ``init``, found by probing.

    optax does not export it; one call of the public `optax.tree.map_params` with an ``init``
    that records what it receives gives the type without importing optax's private modules.
    """
    seen = []
    optax.tree.map_params(lambda params: seen.append(type(params)) or (), lambda *_: None, ())
    return seen[0]


_PARAMS_PLACEHOLDER = _params_placeholder_type()


def is_params_placeholder(tree: Any) -> bool:
    """True for the opaque placeholder that `optax.tree.map_params` calls ``init`` with."""
    return isinstance(tree, _PARAMS_PLACEHOLDER)


class NotParams:
    """Stands in (as a leaf), under `optax.tree.map_params`, for state that is not params-shaped."""
