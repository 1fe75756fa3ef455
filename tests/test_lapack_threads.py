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
from omgd_jax._src import lapack_threads
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


# One stacked matrix (2 layers of 160 x 48) whose QR / SVD (>= 9216 elements) makes OpenBLAS
# start its worker threads inside XLA:CPU's LAPACK call: the GPT-2 small-bytes step, reduced.
_CPU_STEP = """
import jax
import omgd_jax
from omgd_jax._src import lapack_threads
from omgd_jax._src.baselines.mofasgd import scale_by_mofasgd
before = lapack_threads.blas_threads()
tx = {{
    "mofasgd": scale_by_mofasgd(32),
    "galore": omgd_jax.galore(1e-3, rank=32, update_proj_gap=1, leaves="w"),
    "golore": omgd_jax.golore(1e-3, rank=32, update_proj_gap=1, leaves="w"),
}}["{name}"]
params = {{"w": jax.random.normal(jax.random.key(0), (2, 160, 48))}}
state = jax.jit(tx.init)(params)
update = jax.jit(tx.update)
for i in range(3):
    g = {{"w": jax.random.normal(jax.random.key(i + 1), (2, 160, 48))}}
    u, state = update(g, state, params)
jax.block_until_ready(u)
print("blas threads", before, lapack_threads.blas_threads())
"""


@pytest.mark.parametrize("name", ["mofasgd", "galore", "golore"])
def test_cpu_update_runs_lapack_on_one_blas_thread(name):
    """The stall of MoFaSGD's small-bytes step on a shared CPU (4-37 s per step, every XLA:CPU
    QR/SVD waiting on OpenBLAS's spinning workers): an update that factors matrices (MoFaSGD's
    QR and SVD, GaLore's SVD, GoLore's QR) sets the BLAS behind XLA's LAPACK to one thread. The
    stall depends on the machine's load; the thread count does not (2 before, as the
    environment asks). In a subprocess (a process-wide setting), guarded by a timeout so that a
    stall fails the test instead of hanging the suite."""
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2", JAX_PLATFORMS="cpu")
    script = textwrap.dedent(_CPU_STEP.format(name=name))
    try:
        result = subprocess.run([sys.executable, "-c", script], env=env, cwd=root,
                                capture_output=True, text=True, timeout=240)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {name} update on CPU stalled (no result in 240 s)")
    assert result.returncode == 0, result.stderr[-3000:]
    before, after = result.stdout.split()[-2:]
    if before in ("None", "1"):
        pytest.skip(f"SciPy's BLAS runs {before} threads here (not OpenBLAS / MKL, or one CPU)")
    assert (before, after) == ("2", "1"), result.stdout
