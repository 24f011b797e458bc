"""CPU paths: ``sorted`` (sort by expert, one addmm per expert: the bias is fused into the GEMM) and
``fused`` with ``torch._grouped_mm`` (CPU fp32 supports it in torch >= 2.8). See ``moe/dispatch.py``
and ``kernels/fused.py``; ``bench moe-layer`` measures which is faster on a given machine."""

from ..moe.dispatch import dispatch_sorted  # noqa: F401
from .fused import dispatch_fused  # noqa: F401
