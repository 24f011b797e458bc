"""Native CPU kernels (C++, built on first use with torch's extension builder): the grouped expert MLP
behind ``cpu_fused`` (``expert_mlp.cpp``; see its header for the scheme).

Why native: on a CPU the per-expert GEMMs of ``cpu_fused`` were ~5-10% slower than one GEMM of the same
total size, because MKL splits each small GEMM across the threads and pays its per-call overhead once
per expert. The C++ op gives each thread an equal block of the expert-sorted rows and runs every
expert segment in it single-threaded, gather, GEMMs, activation and bias sums together, in one
parallel region per direction (measured in docs/performance.md).

Optional by design: the build needs a C++ compiler and ``ninja`` (a dependency of moevision). When
either is missing, the build fails, or ``MOEVISION_NATIVE=0`` is set, ``ops()`` returns None and
``cpu_fused`` runs its Python loop (the reference the op is tested against). ``status()`` says which
and why; ``moevision bench`` prints it. The first build takes ~20 s and is cached by torch under
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); a changed source rebuilds.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

SOURCE = Path(__file__).with_name("expert_mlp.cpp")
CFLAGS = ["-O3", "-fopenmp"]
ACT_CODES = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3}


def _name() -> str:
    """The extension's name carries a hash of its source, its path and the flags: a changed source builds
    afresh (and says so) instead of silently rebuilding over the old one, and two checkouts do not rebuild
    over each other (torch's builder keys a build directory by name but rebuilds when the source path
    changes)."""
    import hashlib

    h = hashlib.sha256(SOURCE.read_bytes() + str(SOURCE.resolve()).encode() + " ".join(CFLAGS).encode())
    h = h.hexdigest()[:10]
    return f"moevision_cpu_native_{h}"


_lock = threading.Lock()
_state: dict = {"tried": False, "ops": None, "reason": "not built yet", "enabled": True}


def _disabled_by_env() -> bool:
    return os.environ.get("MOEVISION_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def build(verbose: bool = False):
    """Build (or load the cached build of) the extension; returns ``torch.ops.moevision_cpu`` or raises."""
    import torch
    from torch.utils import cpp_extension

    if hasattr(torch.ops, "moevision_cpu") and hasattr(torch.ops.moevision_cpu, "expert_mlp_fwd"):
        return torch.ops.moevision_cpu
    name = _name()
    try:
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        fresh = not any(build_dir.glob("*.so"))
    except Exception:  # a private helper of torch: only for the message
        build_dir, fresh = "TORCH_EXTENSIONS_DIR", True
    if fresh:
        print(f"moevision: building the native CPU kernels (once, ~20 s; cached in {build_dir})",
              file=sys.stderr, flush=True)
    cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                       is_python_module=False, verbose=verbose)
    return torch.ops.moevision_cpu


def ops():
    """``torch.ops.moevision_cpu`` when the native kernels are enabled and built, else None (first call
    builds; a failure is remembered, see ``status``)."""
    if not _state["enabled"]:
        return None
    if _state["tried"]:
        return _state["ops"]
    with _lock:
        if not _state["tried"]:
            if _disabled_by_env():
                _state["reason"] = "disabled by MOEVISION_NATIVE=0"
            else:
                try:
                    _state["ops"] = build()
                    _state["reason"] = "compiled on first use, cached"
                except Exception as exc:  # no compiler / ninja / headers: fall back to the Python loop
                    msg = str(exc).strip().splitlines()
                    _state["reason"] = f"build failed: {type(exc).__name__}: {msg[-1] if msg else ''}"[:500]
                    print(f"moevision: native CPU kernels unavailable ({_state['reason']}); using the "
                          "Python per-expert loop (same results, ~5-10% slower)", file=sys.stderr)
            _state["tried"] = True
    return _state["ops"]


def set_enabled(enabled: bool) -> None:
    """Switch the native kernels on or off for this process (A/B benchmarks, tests)."""
    _state["enabled"] = bool(enabled)


def status() -> str:
    """One line: whether the native kernels are in use, and why not."""
    if not _state["enabled"]:
        return "native CPU kernels: switched off (kernels.use_native(False))"
    if not _state["tried"]:
        return "native CPU kernels: not loaded yet (built on first use)"
    return f"native CPU kernels: {'in use' if _state['ops'] is not None else 'not in use'} ({_state['reason']})"


def main(argv=None) -> int:
    """``python -m moevision.kernels.native``: build now (the Makefile does this at install time)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m moevision.kernels.native", description=__doc__.split("\n\n")[0])
    p.add_argument("--verbose", action="store_true", help="show the compiler's output")
    a = p.parse_args(argv)
    if _disabled_by_env():
        print("native CPU kernels: disabled by MOEVISION_NATIVE=0")
        return 0
    try:
        build(verbose=a.verbose)
    except Exception as exc:
        print(f"native CPU kernels: build failed ({type(exc).__name__}: {exc}); moevision will use its "
              "Python loop instead. Needs a C++ compiler (apt-get install g++) and ninja (pip install ninja).")
        return 1
    print("native CPU kernels: ready (built once, then loaded from the cache)")
    return 0
