"""Experts Weights Averaging (EWA; Huang et al. 2023, "Experts Weights Averaging: A New General Training
Scheme for Vision Transformers", arXiv 2308.06093).

Training: some FFNs become MoE layers with a random uniform partition router (``router="random"``: no
router parameters, no aux loss, no gate scaling). After every optimiser step each expert is pulled
toward the others with share rate beta (``ewa_update``). After training each MoE is averaged back into
one FFN (``merge_experts_to_dense``), so inference has the dense ViT's architecture and cost.

No official code was found; every choice below is [R] in the spec and is an option:
- ``mode="others"`` (paper's share-rate form): P_i <- (1 - beta) P_i + beta / (N - 1) * sum_{j != i} P_j;
  ``mode="mean"``: P_i <- (1 - beta) P_i + beta * mean_j P_j. Both leave the expert mean unchanged.
- The optimiser state (Adam moments) is per expert and is not averaged.
- "Early EWA" (the paper's fix for a naive router-based MoE kept at inference; details [R]): with
  ``techniques.ewa.stop_fraction < 1`` on a model whose MoE layers have a learned router (top-k, expert
  choice, soft, ...) and no random-partition layers, the same update acts on those layers' experts during
  the first ``stop_fraction`` of the optimiser steps and then stops; the model is not merged afterwards.
  A model with random-partition layers always gets EWA on those layers only (the default, unchanged).
  Whole-training EWA (``stop_fraction = 1``) on router-based layers is refused as a config error.
"""

from __future__ import annotations

import copy

import torch

from ..errors import ConfigError
from ..moe import MoE


def ewa_layers(model: torch.nn.Module, *, routers: tuple[str, ...] | None = ("random",)) -> list[MoE]:
    """The MoE layers EWA acts on: those with a random-partition router (all MoE layers if None)."""
    return [m for m in model.modules() if isinstance(m, MoE) and (routers is None or m.router_name in routers)]


@torch.no_grad()
def ewa_update(layers: list[MoE], beta: float, *, mode: str = "others") -> None:
    """One EWA step on every expert tensor (w1, w2, w3, b1, b2) of ``layers``."""
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"EWA share rate beta must be in [0, 1], got {beta}")
    if mode not in ("others", "mean"):
        raise ConfigError(f"EWA mode must be 'others' or 'mean', got {mode!r}")
    for layer in layers:
        n = layer.num_experts
        if n < 2:
            continue
        # "others": (1-b) P_i + b/(N-1) (N mean - P_i) = (1 - b N/(N-1)) P_i + b N/(N-1) mean
        pull = beta * n / (n - 1) if mode == "others" else beta
        for p in layer.experts.parameters():
            mean = p.mean(dim=0, keepdim=True)
            p.mul_(1.0 - pull).add_(mean, alpha=pull)


@torch.no_grad()
def merge_experts_to_dense(model: torch.nn.Module) -> torch.nn.Module:
    """A dense ViT whose MLP in each MoE block is the average of that block's experts (biases too).

    Exact when the experts are equal (then the merged model computes what the MoE computes with
    weight-1 gates). Requires GELU-style experts of the dense MLP's width. The result has the MoE's
    dtype and device; non-expert weights are copied bit for bit.
    """
    from ..models.vit import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"merge_experts_to_dense expects a moevision VisionTransformer, got {type(model).__name__}")
    cfg = copy.deepcopy(model.config)
    hidden = int(cfg.embed_dim * cfg.mlp_ratio)
    if cfg.expert_hidden_ratio and int(cfg.embed_dim * cfg.expert_hidden_ratio) != hidden:
        raise ConfigError("cannot merge: expert hidden width differs from the dense MLP width")
    cfg.moe_layers = "none"
    dense = VisionTransformer(cfg).to(next(model.parameters()).dtype)  # keep the MoE's dtype (fp64 too)
    state = {}
    for k, v in model.state_dict().items():
        if ".mlp.router." in k:
            continue
        if ".mlp.experts." in k:
            prefix, name = k.split(".mlp.experts.")
            if name == "w3":
                raise ConfigError("cannot merge SwiGLU experts into the GELU ViT MLP")
            mean = v.mean(dim=0)
            target = {"w1": ("fc1.weight", mean.t()), "w2": ("fc2.weight", mean.t()),
                      "b1": ("fc1.bias", mean), "b2": ("fc2.bias", mean)}[name]
            state[f"{prefix}.mlp.{target[0]}"] = target[1].contiguous()
        else:
            state[k] = v
    dense.load_state_dict(state)
    dense.model_name = f"{getattr(model, 'model_name', 'vit')}_ewa_merged"
    return dense.to(next(model.parameters()).device)


def _ewa_hooks(cfg, model: torch.nn.Module) -> list:
    ec = cfg.techniques.ewa
    if not ec.enabled:
        return []
    layers = ewa_layers(model)
    if not layers and ec.stop_fraction < 1.0:  # Early EWA on a router-based MoE kept at inference
        layers = ewa_layers(model, routers=None)
    if not layers:
        routed = ewa_layers(model, routers=None)
        raise ConfigError("techniques.ewa.enabled=true needs MoE layers with model.router=random "
                          "(EWA's random uniform partition)"
                          + (f"; for Early EWA on this model's {routed[0].router_name!r}-routed MoE layers set "
                             "techniques.ewa.stop_fraction < 1" if routed else ""))

    def hook(model: torch.nn.Module, step: int, total_steps: int) -> None:
        if step <= ec.stop_fraction * total_steps:
            ewa_update(layers, ec.beta, mode=ec.mode)

    return [hook]


def _register() -> None:
    from ..train.hooks import register_hook_factory

    register_hook_factory("ewa", _ewa_hooks)


_register()
