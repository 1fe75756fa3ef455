"""Sharded state and multi-device equality: runs `tests/devices/eight_devices.py` on 8 forced
CPU devices in a subprocess (XLA_FLAGS must be set before jax is imported)."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_checks_on_eight_cpu_devices():
    # -O0: these small programs compile in a third less time; both sides of every comparison
    # run under the same flags.
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=flags)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-x",
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
