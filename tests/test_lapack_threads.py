"""lapack_threads: one BLAS thread under XLA:CPU's LAPACK kernels, in a subprocess (the setting
is process-wide)."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from omgd_jax import lapack_threads
before = lapack_threads.blas_threads()
first, again = lapack_threads.single_threaded_lapack(), lapack_threads.single_threaded_lapack()
a = np.random.default_rng(0).normal(size=(160, 64)).astype(np.float32)
q, r = jax.jit(jnp.linalg.qr)(a)
err = float(np.abs(np.asarray(q) @ np.asarray(r) - a).max())
print(before, lapack_threads.blas_threads(), first, again, err < 1e-4)
"""


def test_single_threaded_lapack_sets_one_blas_thread_and_qr_still_factors():
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_SCRIPT)], env=env, cwd=root,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    before, after, first, again, factors = result.stdout.split()
    if before in ("None", "1"):
        pytest.skip(f"SciPy's BLAS runs {before} threads here (not OpenBLAS / MKL, or one CPU)")
    assert (before, after) == ("2", "1")  # as the environment asked, then one
    assert (first, again) == ("True", "True")  # found and set; a second call is a no-op
    assert factors == "True"  # Q R == A
