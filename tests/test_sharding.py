"""Sharded state and multi-device equality: runs `tests/devices/eight_devices.py` on 8 forced
CPU devices in a subprocess (XLA_FLAGS must be set before jax is imported)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


# Two halves in two subprocesses, so that the test workers run them side by side.
HALVES = {
    "every-transformation": "equal_one_device and not lean",
    "the-rest": "not (equal_one_device and not lean)",
}


@pytest.mark.parametrize("half", list(HALVES))
def test_checks_on_eight_cpu_devices(half):
    # -O0: these small programs compile in a third less time; both sides of every comparison
    # run under the same flags.
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-x",
            "-k",
            HALVES[half],
            "tests/devices/eight_devices.py",
        ],  # fmt: skip
        env=env,
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
