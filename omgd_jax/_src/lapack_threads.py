"""One BLAS thread under XLA:CPU's LAPACK kernels (QR, SVD, eigh, ...).

On CPU, jaxlib runs ``jnp.linalg`` decompositions through the LAPACK of SciPy
(``scipy.linalg.cython_lapack``), whose BLAS (OpenBLAS in SciPy's wheels) starts its own worker
threads for level-2/3 calls above a size threshold (e.g. the rank-1 updates of a Householder QR
of a 384 x 64 matrix) and busy-waits for them. Called from inside an XLA:CPU program, whose
intra-op pool already holds every core, those workers get a core only at scheduler ticks when
the machine is shared, and small QRs and SVDs take thousands of times their single-threaded
time (the figures are in the CHANGELOG). With one BLAS thread the same calls run at their
single-threaded speed; XLA's own pool still parallelises across independent ops.
"""

from __future__ import annotations

import ctypes
import functools

import jax

# Thread-count setters of the BLAS libraries SciPy may link (its wheels: scipy-openblas).
_SETTERS = (
    "scipy_openblas_set_num_threads",
    "scipy_openblas_set_num_threads64_",
    "openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "MKL_Set_Num_Threads",
)
_GETTERS = (
    "scipy_openblas_get_num_threads",
    "scipy_openblas_get_num_threads64_",
    "openblas_get_num_threads",
    "openblas_get_num_threads64_",
    "MKL_Get_Max_Threads",
)


def _lapack_blas() -> ctypes.CDLL | None:
    """The library jaxlib's CPU LAPACK kernels come from, with its BLAS among its dependencies
    (``dlsym`` on its handle searches them); None without SciPy."""
    try:
        from scipy.linalg import cython_lapack
    except ImportError:  # pragma: no cover - jax depends on scipy
        return None
    return ctypes.CDLL(cython_lapack.__file__)


def _function(names, restype, argtypes):
    """The first of ``names`` the BLAS behind SciPy's LAPACK exports, typed; None if none."""
    lib = _lapack_blas()
    if lib is None:
        return None
    for name in names:
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype, fn.argtypes = restype, argtypes
            return fn
    return None


def blas_threads() -> int | None:
    """The thread count of the BLAS behind XLA:CPU's LAPACK kernels (None: not OpenBLAS/MKL)."""
    getter = _function(_GETTERS, ctypes.c_int, [])
    return None if getter is None else int(getter())


@functools.cache
def single_threaded_lapack() -> bool:
    """Sets the BLAS behind XLA:CPU's LAPACK kernels to one thread, once per process.

    A process-wide setting of SciPy's BLAS (NumPy's own BLAS is a separate library and keeps its
    threads). Returns whether a known BLAS (OpenBLAS, MKL) was found and set.
    """
    setter = _function(_SETTERS, None, [ctypes.c_int])
    if setter is None:
        return False
    setter(1)
    return True


def single_threaded_lapack_on_cpu() -> bool:
    """:func:`single_threaded_lapack` when JAX's default backend is CPU, where XLA runs LAPACK;
    what an optimizer that calls ``jnp.linalg`` (MoFaSGD, GaLore, GoLore) runs when it is built
    into a program. Returns whether the BLAS was set (False off CPU)."""
    return jax.default_backend() == "cpu" and single_threaded_lapack()
