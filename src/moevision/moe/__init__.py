"""The core MoE layer: routers, dispatch, experts and auxiliary losses (depends only on torch)."""

from .capacity import compute_capacity
from .dispatch import DISPATCH_IMPLS, get_dispatch, register_dispatch
from .experts import Experts
from .layer import MoE, ROUTERS
from .placement import moe_layer_indices
from .router import ExpertChoiceRouter, RandomRouter, SoftRouter, TopKRouter
from .types import MoEOutput, RoutingPlan, RoutingStats, SoftRoutingPlan

__all__ = [
    "MoE", "ROUTERS", "MoEOutput", "RoutingPlan", "RoutingStats", "SoftRoutingPlan", "Experts",
    "TopKRouter", "ExpertChoiceRouter", "SoftRouter", "RandomRouter", "compute_capacity",
    "DISPATCH_IMPLS", "get_dispatch", "register_dispatch", "moe_layer_indices",
]
