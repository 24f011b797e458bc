"""Data contracts of the MoE layer: what a router returns and what the layer returns.

Shape legend: G routing groups, S tokens per group, T = G*S tokens, D width, E experts, K top-k,
A assignments (token, expert) pairs, C capacity (slots per expert per group), P slots (soft MoE).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RoutingPlan:
    """A sparse routing decision for T = G*S tokens, as a flat list of A (token, expert) assignments.

    Token choice gives A = T*K assignments ordered token-major (assignment a = t*K + j is token t's j-th
    choice); expert choice gives A = G*E*C. Dropped assignments stay in the list with ``kept`` False and
    gate 0, so shapes do not depend on the routing (no host sync needed to build the plan).
    """

    token_idx: torch.Tensor  # (A,) int64, index into the T flattened tokens
    expert_idx: torch.Tensor  # (A,) int64
    gates: torch.Tensor  # (A,) combine weight; 0 where dropped
    kept: torch.Tensor  # (A,) bool
    slot: torch.Tensor | None  # (A,) position in the expert's buffer of its group; None if unknown
    probs_GSE: torch.Tensor  # router probabilities (fp32), kept for losses and statistics
    logits_GSE: torch.Tensor  # clean router logits (fp32)
    capacity: int | None  # slots per expert per group; None = dropless
    aux_losses: dict[str, torch.Tensor]  # unweighted loss values, by name
    aux_loss: torch.Tensor  # weighted sum, scalar
    top_k: int = 1  # assignments per token for token-choice plans (0 for expert choice)


@dataclass
class SoftRoutingPlan:
    """Soft MoE routing: every slot is a convex combination of the group's tokens and back."""

    dispatch_GSP: torch.Tensor  # softmax over tokens (dim 1), per slot
    combine_GSP: torch.Tensor  # softmax over slots (dim 2), per token
    logits_GSP: torch.Tensor
    slots_per_expert: int
    aux_losses: dict[str, torch.Tensor]
    aux_loss: torch.Tensor


@dataclass
class RoutingStats:
    """Per-layer routing statistics (all detached)."""

    tokens_per_expert: torch.Tensor  # (E,) float: kept assignments per expert (soft MoE: dispatch mass)
    dropped_fraction: torch.Tensor  # scalar: fraction of assignments dropped by capacity
    dropped_token_fraction: torch.Tensor  # scalar: fraction of tokens whose every assignment was dropped
    router_entropy: torch.Tensor  # scalar: mean entropy of the router's distribution over experts
    importance: torch.Tensor  # (E,) summed router probability per expert
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted, detached
    capacity: int | None = None
    expert_idx: torch.Tensor | None = None  # (..., K) per-token expert ids, only when recording
    gates: torch.Tensor | None = None  # (..., K) per-token combine weights, only when recording
    # also only when recording (analytics): token choice's kept flags, router probabilities, and for
    # soft MoE each token's dispatch mass per expert (``gates``/``probs`` then hold its combine mass)
    kept: torch.Tensor | None = None  # (..., K) bool: assignment not dropped by capacity (token choice)
    probs: torch.Tensor | None = None  # (..., E) clean router probabilities (soft MoE: combine mass)
    dispatch: torch.Tensor | None = None  # (..., E) soft MoE only: dispatch mass per expert


@dataclass
class MoEOutput:
    """What ``MoE.forward`` returns."""

    out: torch.Tensor  # same shape as the input
    aux_loss: torch.Tensor  # scalar, already weighted
    stats: RoutingStats
