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

    token_idx: torch.Tensor  # (A,) int64, index into the T flattened tokens (None: token-major, a // top_k)
    expert_idx: torch.Tensor  # (A,) int64
    gates: torch.Tensor  # (A,) combine weight; 0 where dropped (or a LowpGates: rounded on first read)
    kept: torch.Tensor  # (A,) bool (None: all kept)
    slot: torch.Tensor | None  # (A,) position in the expert's buffer of its group; None if unknown
    probs_GSE: torch.Tensor  # router probabilities (fp32), kept for losses and statistics
    logits_GSE: torch.Tensor  # clean router logits (fp32)
    capacity: int | None  # slots per expert per group; None = dropless
    aux_losses: dict[str, torch.Tensor]  # unweighted loss values, by name
    aux_loss: torch.Tensor  # weighted sum, scalar
    top_k: int = 1  # assignments per token for token-choice plans (0 for expert choice)
    # (T, D): x as the router's logits node passed it on (moe.router._LowpLogitsFork), or None. Dispatching
    # from it instead of x gives the same values and gradients; x's two gradients then meet in that node,
    # which sums them inside its own backward pass (one kernel fewer, one (T, D) round trip less)
    dispatch_x: torch.Tensor | None = None

    def fp32_gates(self) -> torch.Tensor | None:
        """The router's fp32 gates that ``gates`` is the rounding of (a plan made with ``LowpGates``), while
        ``gates`` has been neither replaced nor changed in place; else None. A kernel that reads the gates in
        fp32 anyway (``fused``'s Triton combine) takes these: no rounding kernel forward (``gates`` is then
        never made unless read) and no conversion kernels backward."""
        src = self.__dict__.get("_gates_src")
        if src is None:
            return None
        made = self.__dict__.get("_gates")
        if made is not None and made._version != self.__dict__["_gates_version"]:
            return None
        return src


@dataclass(frozen=True)
class LowpGates:
    """``RoutingPlan(gates=LowpGates(g, dtype))``: the plan's gates are ``g.to(dtype)``, made on first read of
    ``plan.gates``; ``plan.fp32_gates()`` gives ``g`` (fp32) to kernels that read fp32."""

    source: torch.Tensor
    dtype: torch.dtype


# Three RoutingPlan fields made on first read (a training step on the GPU path reads none of them: each
# would be a kernel launch). A property replaces each dataclass field after the class is made, so the
# constructor, ``dataclasses.replace`` and ``fields`` keep working: the generated __init__ assigns through
# the setter, and assigning a tensor later replaces the lazy value (and drops the fp32 link of ``gates``).
def _token_major(plan) -> torch.Tensor:
    A, K = plan.expert_idx.numel(), plan.top_k
    if K < 1:
        raise ValueError("an expert-choice RoutingPlan (top_k=0) needs its token_idx")
    t = torch.arange(A, device=plan.expert_idx.device)
    return torch.div(t, K, rounding_mode="floor") if K > 1 else t


def _all_kept(plan) -> torch.Tensor:
    return torch.ones(plan.expert_idx.shape, dtype=torch.bool, device=plan.expert_idx.device)


def _lazy_field(name: str, make) -> property:
    """A field stored as ``_name``; None there means ``make(plan)``, made on first read and kept."""
    key = "_" + name

    def get(self) -> torch.Tensor:
        v = self.__dict__.get(key)
        if v is None:
            v = self.__dict__[key] = make(self)
        return v

    def put(self, value) -> None:
        self.__dict__[key] = value
    return property(get, put)


def _get_gates(self) -> torch.Tensor:
    g = self.__dict__.get("_gates")
    if g is None:
        src = self.__dict__["_gates_src"]
        g = self.__dict__["_gates"] = src.to(self.__dict__["_gates_dtype"])
        self.__dict__["_gates_version"] = g._version
    return g


def _set_gates(self, value) -> None:
    if isinstance(value, LowpGates):
        if value.source.dtype != torch.float32:
            raise ValueError(f"LowpGates needs fp32 gates, got {value.source.dtype}")
        self.__dict__.update(_gates=None, _gates_src=value.source, _gates_dtype=value.dtype)
    else:
        self.__dict__.update(_gates=value, _gates_src=None)


RoutingPlan.token_idx = _lazy_field("token_idx", _token_major)  # type: ignore[assignment]
RoutingPlan.kept = _lazy_field("kept", _all_kept)  # type: ignore[assignment]
RoutingPlan.gates = property(_get_gates, _set_gates)  # type: ignore[assignment]


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
