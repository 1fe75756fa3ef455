"""Keyword names that changed: the old ones still work, with a `DeprecationWarning`.

One vocabulary across the library: ``layers=`` picks the transformer layers of a layer-wise
traversal, ``leaves=`` the leaves a per-leaf method acts on (GaLore's projected matrices, SIFT's
sparse weights, SkipUpdate's masked blocks, MoFaSGD's factored matrices), ``stacked=`` which of
them are stacks of layers, and ``mask=`` the weight-decay mask.
"""

from __future__ import annotations

import functools
import warnings


def renamed(**old_to_new: str):
    """Decorates a factory so that ``old=`` keywords are accepted as ``new=`` (with a warning)."""

    def decorate(factory):
        @functools.wraps(factory)
        def wrapped(*args, **kwargs):
            for old, new in old_to_new.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(
                        f"{factory.__name__}: {old}= is the old name of {new}=; pass {new}= only"
                    )
                warnings.warn(
                    f"{factory.__name__}: {old}= is now called {new}=",
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return factory(*args, **kwargs)

        return wrapped

    return decorate
