"""Keep freed host memory in the process, so XLA:CPU's per-call buffers stop page-faulting.

XLA:CPU allocates the temporary buffer of a compiled program afresh on every call. With
glibc's defaults a buffer that large is mapped with ``mmap`` and unmapped when the call ends,
so every call touches new pages: an 81 MiB temporary costs 20,766 minor page faults (about
20 ms on this machine) per call, more than the arithmetic of a lean update. Accelerators keep
a pooled allocator and pay nothing of the kind. `hold_freed_memory` makes glibc serve every
allocation from one heap that is never trimmed, so a buffer freed by one call is reused by the
next. It must run before JAX starts its CPU client (its threads pick their malloc arena then);
both rows of a comparison run in the same process, so they get the same allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

# glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
MALLOC_CHOICES = ("hold", "default")


def hold_freed_memory() -> bool:
    """One malloc arena, no mmap'd chunks, no trimming; False where libc is not glibc."""
    path = ctypes.util.find_library("c")
    if path is None:
        return False
    libc = ctypes.CDLL(path)
    if not hasattr(libc, "mallopt"):
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))  # -1: never trim
    return all(libc.mallopt(k, v) == 1 for k, v in settings)


def add_argument(parser) -> None:
    """The ``--malloc`` flag of the timing benchmarks."""
    parser.add_argument(
        "--malloc",
        default="hold",
        choices=MALLOC_CHOICES,
        help="hold: keep freed host memory (no per-call page faults); default: glibc as is",
    )


def configure(choice: str) -> str:
    """Applies ``--malloc`` (one of MALLOC_CHOICES) and says what is in effect."""
    if choice not in MALLOC_CHOICES:
        raise ValueError(f"--malloc must be one of {MALLOC_CHOICES}, got {choice!r}")
    if choice == "hold" and hold_freed_memory():
        return "hold (glibc: one arena, no mmap, no trim)"
    return "default"


def minor_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
