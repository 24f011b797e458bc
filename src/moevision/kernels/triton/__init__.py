"""Optional Triton kernels (``pip install triton``; used on CUDA only). Importing this package never
fails: ``AVAILABLE`` says whether Triton imported, ``REASON`` why not."""

from __future__ import annotations

AVAILABLE = False
REASON = ""
bias_act_triton = None
combine_triton = None
gather_sum = None
plan_indices = None
router_core_triton = None
router_dx_triton = None
try:  # pragma: no cover - depends on the environment
    import triton  # noqa: F401

    from .bias_act import bias_act_triton  # noqa: F811
    from .combine import combine_triton, gather_sum  # noqa: F811
    from .plan import plan_indices  # noqa: F811
    from .router import router_core_triton, router_dx_triton  # noqa: F811

    AVAILABLE = True
except Exception as e:  # ImportError, or a Triton that cannot initialise
    REASON = f"{type(e).__name__}: {e}"
