"""Expert capacity (V-MoE semantics; Riquelme et al. 2021, vmoe ``compute_capacity``).

C = ceil(num_tokens * c / E) (or round), at least 1, then rounded UP to a multiple of ``multiple_of``.
Token choice passes num_tokens = S*K; expert choice and soft MoE pass num_tokens = S.
The product is taken in float64 so 400*2*1.05/8 gives 105, not 106.
"""

from __future__ import annotations

import math

from ..errors import ConfigError


def compute_capacity(
    num_tokens: int,
    num_experts: int,
    capacity_factor: float,
    *,
    mode: str = "ceil",
    multiple_of: int | None = 4,
) -> int:
    if num_tokens < 1:
        raise ConfigError(f"num_tokens must be >= 1, got {num_tokens}")
    if num_experts < 1:
        raise ConfigError(f"num_experts must be >= 1, got {num_experts}")
    if not capacity_factor > 0:
        raise ConfigError(f"capacity_factor must be > 0, got {capacity_factor}")
    raw = float(num_tokens) * float(capacity_factor) / float(num_experts)
    if mode == "ceil":
        cap = math.ceil(raw)
    elif mode == "round":
        cap = int(round(raw))
    else:
        raise ConfigError(f"capacity mode must be 'ceil' or 'round', got {mode!r}")
    if cap < 1:
        raise ConfigError(
            f"capacity {raw:.3g} < 1 slot (num_tokens={num_tokens}, num_experts={num_experts}, "
            f"capacity_factor={capacity_factor}); raise the capacity factor or the group size"
        )
    if multiple_of:
        cap += (-cap) % multiple_of
    return cap
