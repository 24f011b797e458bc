"""Small shared helpers."""

from __future__ import annotations

import ctypes
import os
import platform
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write ``path`` through a temporary file in the same directory and an atomic rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


_MALLOC_STATE: str | None = None


def tune_malloc() -> str:
    """Make glibc keep freed large blocks for reuse (``moevision bench``'s default). Returns what was done.

    By default glibc serves allocations above its (dynamic) mmap threshold with a fresh ``mmap`` and
    gives them back when freed, or trims the heap top back to the OS: a step that allocates and frees
    the same activation-sized tensors every iteration may then page-fault through them again each time
    (measured: 0 or ~10k minor faults per step for the same code, depending on the heap's layout; ~6.6k
    for the dense ViT-Ti FFN forward+backward). Raising the mmap threshold to glibc's maximum (32 MiB)
    and the trim threshold to 1 GiB makes the heap behave like a caching allocator, as PyTorch's CPU
    tuning guide suggests with jemalloc/tcmalloc. Benchmarks use it so that this noise does not hit
    candidates unevenly; training does not (measured on the main job: 808 vs 806 images/s, no gain).
    Process-wide; the memory peak is unchanged, the process just keeps it. ``MOEVISION_MALLOC=default``
    opts out. A no-op (returning why) off glibc."""
    global _MALLOC_STATE
    if _MALLOC_STATE is not None:
        return _MALLOC_STATE
    if os.environ.get("MOEVISION_MALLOC", "").lower() == "default":
        _MALLOC_STATE = "default (MOEVISION_MALLOC=default)"
    elif platform.libc_ver()[0] != "glibc":
        _MALLOC_STATE = "default (not glibc)"
    else:
        try:
            mallopt = ctypes.CDLL(None).mallopt
            M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
            ok = mallopt(M_MMAP_THRESHOLD, 32 * 2**20) == 1 and mallopt(M_TRIM_THRESHOLD, 2**30) == 1
        except (OSError, AttributeError):
            ok = False
        _MALLOC_STATE = "tuned (mmap threshold 32 MiB, trim threshold 1 GiB)" if ok else "default (mallopt failed)"
    return _MALLOC_STATE


def malloc_state() -> str:
    """What ``tune_malloc`` did in this process (``default`` when it was not called)."""
    return _MALLOC_STATE or "default"
