"""Techniques from the papers, reaching models by weight surgery, wrappers or module replacement
(never by branches inside the core)."""

from .ewa import ewa_layers, ewa_update, merge_experts_to_dense
from .moa import MoAAttention
from .moh import MoHAttention
from .momentum import MomentumBlock, robust_constants

__all__ = ["ewa_layers", "ewa_update", "merge_experts_to_dense", "MoAAttention", "MoHAttention", "MomentumBlock",
           "robust_constants"]
