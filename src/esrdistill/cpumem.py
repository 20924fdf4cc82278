"""Keep freed memory in the process on the CPU, so that a training step does not fault its pages in again.

With glibc's defaults, a block of 128 KiB or more (the threshold moves up to 32 MiB as blocks are freed)
is mmapped, and unmapped again when it is freed; the top of the heap is returned to the kernel once 128
KiB or more lies free there. A CPU training step allocates and frees its activations and gradients
(about 1.5 GB for SmolLM2-135M at batch 4 and 256 tokens), so every step faults them in again: 338k-412k
page faults per step, measured with `scripts/freed_memory.py` (docs/training.md, "Freed memory on the CPU").
What a fault costs depends on the host (under KVM it varied between processes, and on one host it grew when the
process held more memory, such as the in-process vLLM engine's 2.3 GB), which is what slowed the train phase
beside vLLM.

`keep_freed_memory()` sets `M_MMAP_MAX=0` (no block is mmapped: all come from the heap) and
`M_TRIM_THRESHOLD=-1` (glibc reads it as SIZE_MAX: the heap is never trimmed), so that memory freed by
one step is reused by the next. The process's resident memory then stays at its peak, which it reaches
in any case at every step. The same settings as environment variables, for another process:
`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=18446744073709551615`.

Pure glibc: nothing is done, and False is returned, on another C library (musl, macOS, Windows).
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers, from glibc's malloc.h
M_MMAP_MAX = -4


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None
    return libc


def _mallopt(libc: ctypes.CDLL, parameter: int, value: int) -> bool:
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc.mallopt(parameter, value) == 1  # mallopt returns 1 on success, 0 on error


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (no mmapped blocks, no heap trim); True when it took."""
    libc = _glibc()
    if libc is None:
        return False
    return _mallopt(libc, M_MMAP_MAX, 0) and _mallopt(libc, M_TRIM_THRESHOLD, -1)
