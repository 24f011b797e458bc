"""GPU paths: ``fused`` (grouped GEMMs + scatter-free permute/combine + Triton bias/activation, no host
sync when dropless) and ``grouped`` (the plain sort + ``torch._grouped_mm`` baseline, torchtitan
style). See ``kernels/fused.py`` and ``moe/dispatch.py``."""

from ..moe.dispatch import dispatch_grouped  # noqa: F401
from .fused import dispatch_fused  # noqa: F401
