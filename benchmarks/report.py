"""The one results format, peak-memory definition and timing loop every benchmark uses.

Every JSON under ``benchmarks/results/`` (and the examples' results) is::

    {"meta": {jax, jaxlib, backend, device, cpu_count, xla_flags, allocator, command, commit,
              date, ...}, "records": [{...}, ...]}

written by :func:`write`. Peak step memory is :func:`peak_bytes`: argument + temp bytes of the
compiled, donated step (``jax.jit(f, donate_argnums=...).lower(abstract inputs).compile()``).
Times are medians of interleaved rounds (:func:`interleaved_medians`), so the methods of one table
share the machine's state.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

_ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=_ROOT)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _commit() -> str:
    """HEAD, marked when the working tree differs from it (the figures are then not HEAD's)."""
    head = _git("rev-parse", "HEAD") or "unknown"
    return head + (" (+ uncommitted changes)" if _git("status", "--porcelain", "-uno") else "")


def _command(argv: Sequence[str]) -> str:
    """The command line as typed: ``python -m benchmarks.memory ...`` for a module run."""
    argv = list(argv)
    if argv and argv[0].endswith(".py"):
        try:
            rel = Path(argv[0]).resolve().relative_to(_ROOT).with_suffix("")
            argv[0:1] = ["python", "-m", ".".join(rel.parts)]
        except ValueError:
            argv[0:1] = ["python", argv[0]]
    return shlex.join(argv)


def meta(command: Sequence[str] | None = None, **extra: Any) -> dict:
    """What a reader needs to reproduce a table: versions, machine, flags, command, commit, date."""
    import jaxlib

    device = jax.devices()[0]
    out = {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "allocator": os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "default"),
        "command": _command(sys.argv if command is None else command),
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    out.update(extra)
    return out


def document(records: Sequence[Mapping], **meta_fields: Any) -> dict:
    """``{"meta": meta(**meta_fields), "records": list(records)}``."""
    return {"meta": meta(**meta_fields), "records": [dict(r) for r in records]}


def write(path: str | os.PathLike | None, records: Sequence[Mapping], **meta_fields: Any) -> dict:
    """Writes the results document to ``path`` (atomically: a crash never leaves half a file)."""
    doc = document(records, **meta_fields)
    if path is not None:
        save(path, doc)
    return doc


def save(path: str | os.PathLike, doc: Mapping) -> None:
    """Writes an already built document atomically (the resumable benchmarks call it as they go)."""
    if set(doc) < {"meta", "records"}:
        raise ValueError(
            f"{path}: a results document needs 'meta' and 'records', got {sorted(doc)}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def load(path: str | os.PathLike) -> dict:
    """Reads a results document, refusing anything that is not ``{"meta", "records"}``."""
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or "meta" not in doc or "records" not in doc:
        raise ValueError(f"{path}: not a results document (needs 'meta' and 'records')")
    return doc


def memory(compiled) -> dict:
    """Argument, output, temp and peak (argument + temp) bytes of a compiled step."""
    mem = compiled.memory_analysis()
    return {
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "peak_bytes": int(mem.argument_size_in_bytes + mem.temp_size_in_bytes),
    }


def peak_bytes(compiled) -> int:
    """The library's one definition of peak step memory: argument + temp bytes of the compiled,
    donated step (donated outputs alias their arguments, so outputs add nothing)."""
    return memory(compiled)["peak_bytes"]


def compile_step(fn: Callable, *abstract_args, donate_argnums=(0, 1), static_argnums=()):
    """``jax.jit(fn, donate_argnums=...).lower(*abstract_args).compile()``."""
    jitted = jax.jit(fn, donate_argnums=donate_argnums, static_argnums=static_argnums)
    return jitted.lower(*abstract_args).compile()


def interleaved_times(
    runs: Mapping[str, Callable[[], Any]],
    rounds: int,
    *,
    warmup: int = 1,
    steps: int = 1,
    counter: Callable[[], float] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Raw seconds per call of every ``runs[name]()``, timed in ``rounds`` rounds that run each
    in turn, and the increase of ``counter()`` per call over the same blocks.

    A round runs, for every name, a block of ``steps`` calls and then
    ``jax.block_until_ready`` on the last call's result (so a call may return before its
    device work is done, as a jitted step does); the block's time over ``steps`` is that
    round's time. ``warmup`` calls of each run first, untimed (the first call of a compiled
    step allocates). ``counter``: any monotone count of this process, e.g.
    ``benchmarks.host_memory.minor_faults``; without it the counts are empty.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    for fn in runs.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in runs}
    counts: dict[str, list[float]] = {name: [] for name in runs} if counter else {}
    for _ in range(rounds):
        for name, fn in runs.items():
            before = counter() if counter else 0
            start = time.perf_counter()
            for _ in range(steps):
                out = fn()
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / steps)
            if counter:
                counts[name].append((counter() - before) / steps)
    return times, counts


def medians(times: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """``statistics.median`` of every entry."""
    return {name: statistics.median(t) for name, t in times.items()}


def interleaved_medians(
    runs: Mapping[str, Callable[[], Any]], rounds: int, *, warmup: int = 1, steps: int = 1
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median seconds per call of every ``runs[name]()``, timed in ``rounds`` rounds that run
    each in turn (blocks of ``steps`` calls, :func:`interleaved_times`); also the raw times.

    Interleaving makes the methods share thermal and cache state; ratios are best taken per
    round (:func:`median_ratio`).
    """
    times, _ = interleaved_times(runs, rounds, warmup=warmup, steps=steps)
    return medians(times), times


def round_ratios(times: Mapping[str, Sequence[float]], name: str, base: str) -> list[float]:
    """``times[name][r] / times[base][r]`` for every round ``r``."""
    return [a / b for a, b in zip(times[name], times[base], strict=True)]


def median_ratio(times: Mapping[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of ``times[name][r] / times[base][r]``."""
    return statistics.median(round_ratios(times, name, base))


def command_of(module: str, argv: Sequence[str] | None) -> list[str] | None:
    """The ``command=`` of :func:`meta` for ``main(argv)``: ``python -m module *argv`` when
    called with arguments (a test, a notebook), None (``sys.argv``) when run from the shell."""
    return None if argv is None else ["python", "-m", module, *argv]
