"""The data dependences that order XLA's schedule where its own order would raise the peak.

The lean step uses them itself; models use them in their own custom backward passes (the
chunked SwiGLU and the recomputed attention of ``examples/llama/model.py``). Each function's
docstring says why it exists; each has a test in ``tests/test_ordering.py`` that fails without it.
"""

from omgd_jax._src.ordering import after, ids_after, materialise, zeros_after

__all__ = ["after", "ids_after", "materialise", "zeros_after"]
