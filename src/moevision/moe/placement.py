"""Which blocks are MoE, as data (V-MoE "Every n" / "Last n", Soft MoE "second half").

``moe_layer_indices(spec, depth)`` accepts a list of block indices or a string:
``every_n`` -> blocks n-1, 2n-1, ... (``every_2`` = odd blocks); ``last_odd_n`` -> the last n odd
blocks; ``last_n`` -> the last n blocks; ``all``; ``none``.
"""

from __future__ import annotations

import re
from typing import Sequence

from ..errors import ConfigError


def moe_layer_indices(spec: str | Sequence[int] | None, depth: int, key: str = "moe_layers") -> tuple[int, ...]:
    """The block indices ``spec`` names in a model of ``depth`` blocks; ``key`` names the field in errors."""
    if spec is None or spec == "none":
        return ()
    if isinstance(spec, str):
        if spec == "all":
            return tuple(range(depth))
        m = re.fullmatch(r"(every|last_odd|last)_(\d+)", spec)
        if not m:
            raise ConfigError(f"{key}={spec!r} is not understood; use a list of block indices, "
                              f"'every_N', 'last_odd_N', 'last_N', 'all' or 'none'")
        kind, n = m.group(1), int(m.group(2))
        if n < 1:
            raise ConfigError(f"{key}={spec!r}: N must be >= 1")
        if kind == "every":
            return tuple(range(n - 1, depth, n))
        if kind == "last_odd":
            odd = list(range(1, depth, 2))
            return tuple(odd[-n:]) if n <= len(odd) else tuple(odd)
        return tuple(range(max(0, depth - n), depth))
    idx = tuple(int(i) for i in spec)
    bad = [i for i in idx if not 0 <= i < depth]
    if bad:
        raise ConfigError(f"{key}={list(spec)!r} has block indices {bad} outside [0, depth={depth}); use indices "
                          f"0 to {depth - 1}")
    if len(set(idx)) != len(idx):
        raise ConfigError(f"{key}={list(idx)!r} has repeated indices")
    return tuple(sorted(idx))
