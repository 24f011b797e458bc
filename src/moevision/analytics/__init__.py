"""Routing analytics: one pass over a data split recording every MoE layer's routing, statistics on it
(``routing``), plots (``plots``, needs the ``plots`` extra) and an HTML report (``report``)."""

from .routing import (
    LayerRouting,
    RoutingRecord,
    collect_routing,
    conditional,
    dead_experts,
    drop_rates,
    entropy_bits,
    expert_load,
    expert_weight_similarity,
    image_purity,
    joint_counts,
    load_cv,
    mutual_information_bits,
    patch_expert_frequency,
    router_entropy_bits,
    shuffled_image_purity,
    summarize,
)

__all__ = [
    "LayerRouting", "RoutingRecord", "collect_routing", "conditional", "dead_experts", "drop_rates",
    "entropy_bits", "expert_load", "expert_weight_similarity", "image_purity", "joint_counts", "load_cv",
    "mutual_information_bits", "patch_expert_frequency", "router_entropy_bits", "shuffled_image_purity",
    "summarize",
]
