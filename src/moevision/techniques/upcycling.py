"""Sparse upcycling: an MoE ViT from a dense checkpoint (Komatsuzaki et al., "Sparse Upcycling: Training
Mixture-of-Experts from Dense Checkpoints", ICLR 2023; vision_moe.md §4).

Every expert of an upcycled MoE layer is an exact copy of the dense MLP it replaces (vmoe's
``expand_tile`` rule: add an expert axis and tile E times); every other weight is copied verbatim, in
the parent's dtype (an fp64 parent gives an fp64 MoE with bit-identical copies); only the router is new.
The result is an ordinary ``VisionTransformer`` (``save_pretrained``, ``from_pretrained`` and
``moevision train --init DIR`` handle it).

Function preservation (tested): with identical experts an MoE layer computes ``s(x) * MLP(x)`` where
``s(x)`` is the token's summed combine weight. With top-k gates renormalised to sum to 1
(``normalize_topk=True``, the default here) and no dropping (``capacity_factor=None``) the upcycled model
equals the dense one at step 0; with V-MoE's raw top-k softmax gates the MLP branch is scaled by
``s(x) = sum of the top-k probabilities``; with expert choice, tokens no expert picks lose their MLP branch.

Choices the spec marks [R] are options, with these defaults:
- MoE blocks: ``every_2`` (every other MLP; any ``moe_layer_indices`` spec works: ``last_2``, ``all``,
  a list of block indices).
- Routing: token-choice ``topk`` with renormalised gates and dropless dispatch. The paper's vision models
  use expert choice with capacity factor 2 and normalised combine weights; ``router="expert_choice"`` is
  available, but moevision's expert-choice combine weights are the raw router probabilities (not
  renormalised per token), so it is not function-preserving at step 0. That is a deviation.
- Router init: ``lecun`` (normal, std 1/sqrt(D): vmoe's Dense default, which its upcycled models get);
  ``normal`` (std ``router_init_std``, default 0.02), ``zero`` (uniform probabilities; ties then go to
  the lowest expert ids until router noise breaks them), ``linear`` (PyTorch ``nn.Linear`` default, what
  CLIP-MoE's routers get).
- ``expert_noise``: optional Gaussian noise on each expert copy, ``w_e = w + expert_noise * std(w) * eps_e``
  (weights only, biases stay exact); 0 (the paper) by default. Noise breaks step-0 equality.
- Optimiser state: ``upcycle_named_tensors`` maps the dense Adam moments to every expert slot exactly as it
  maps the weights (``moevision upcycle --copy-optimizer-state``; the router starts with empty state).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..models.vit import ViTConfig, VisionTransformer
from ..moe import MoE, moe_layer_indices

ROUTER_INITS = ("lecun", "normal", "zero", "linear")
# ViTConfig fields an upcycle may set besides num_experts / top_k / moe_layers
MOE_OPTIONS = ("router", "capacity_factor", "eval_capacity_factor", "normalize_topk", "noise_std", "batch_priority",
               "group_size", "slots_per_expert", "importance_loss_weight", "load_loss_weight", "switch_loss_weight",
               "z_loss_weight", "moe_impl")
UPCYCLE_DEFAULTS: dict[str, Any] = dict(router="topk", normalize_topk=True, capacity_factor=None,
                                        eval_capacity_factor=None)
# dense MLP key -> (expert key, transpose?)  (nn.Linear stores (out, in); experts store (E, in, out))
_MLP_TO_EXPERT = {"fc1.weight": ("w1", True), "fc1.bias": ("b1", False),
                  "fc2.weight": ("w2", True), "fc2.bias": ("b2", False)}


def upcycled_config(config: ViTConfig, *, num_experts: int, top_k: int = 2, moe_layers: Any = "every_2",
                    **moe_options: Any) -> ViTConfig:
    """The dense ``config`` with the MLPs of ``moe_layers`` turned into E-expert MoE layers."""
    if config.moe_block_indices:
        raise ConfigError(f"upcycle expects a dense model, but blocks {list(config.moe_block_indices)} are already "
                          f"MoE (moe_layers={config.moe_layers!r})")
    unknown = sorted(set(moe_options) - set(MOE_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown upcycle option(s) {unknown}; valid: {list(MOE_OPTIONS)}")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ConfigError(f"num_experts={num_experts!r} must be a positive integer")
    blocks = moe_layer_indices(moe_layers, config.depth)
    if not blocks:
        raise ConfigError(f"moe_layers={moe_layers!r} selects no block of the depth-{config.depth} model")
    cfg = copy.deepcopy(config)
    for k, v in {**UPCYCLE_DEFAULTS, **moe_options}.items():
        setattr(cfg, k, v)
    cfg.num_experts, cfg.top_k = num_experts, top_k
    cfg.moe_layers = list(blocks)
    cfg.expert_hidden_ratio = None  # experts are copies of the dense MLP: same hidden width
    cfg.expert_init = "independent"
    cfg.validate()
    return cfg


def upcycle_named_tensors(dense: dict[str, torch.Tensor], config: ViTConfig, *, expert_noise: float = 0.0,
                          generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Map dense tensors (weights, or per-parameter optimizer moments) to the upcycled model's names.

    In the MoE blocks of ``config``, ``blocks.i.mlp.fc1.weight`` (F, D) becomes ``blocks.i.mlp.experts.w1``
    (E, D, F), tiled E times (``fc2`` -> ``w2`` (E, F, D), biases -> ``b1`` (E, F), ``b2`` (E, D)). Everything
    else is passed through. No router entries are produced.
    """
    E = config.num_experts
    out: dict[str, torch.Tensor] = {}
    for name, t in dense.items():
        target = upcycled_name(name, config)
        if target is None:
            out[name] = t
            continue
        new_name, transpose = target
        src = t.t() if transpose else t
        tiled = src.unsqueeze(0).repeat(E, *([1] * src.dim())).contiguous()
        if expert_noise and transpose:
            eps = torch.randn(tiled.shape, generator=generator, dtype=torch.float32).to(tiled.dtype)
            tiled = tiled + expert_noise * src.float().std().to(tiled.dtype) * eps
        out[new_name] = tiled
    return out


def upcycled_name(name: str, config: ViTConfig) -> tuple[str, bool] | None:
    """(expert tensor name, transposed?) for a dense MLP parameter of an MoE block of ``config``, else None."""
    parts = name.split(".")
    if not (len(parts) >= 5 and parts[0] == "blocks" and parts[2] == "mlp"
            and int(parts[1]) in config.moe_block_indices):
        return None
    key = ".".join(parts[3:])
    if key not in _MLP_TO_EXPERT:
        raise ConfigError(f"cannot upcycle {name}: expected only fc1/fc2 weights and biases in the MLP")
    target, transpose = _MLP_TO_EXPERT[key]
    return ".".join(parts[:3] + ["experts", target]), transpose


def upcycle_optimizer_state(named: dict[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """Per-parameter optimiser state keyed ``<name>::<key>`` (``train.init_from.named_optimizer_state``)
    mapped like the weights: an MLP's Adam moments go to every expert slot, its step count to the expert
    tensors; router entries stay absent (fresh state). Spec §4(b)4 [R]."""
    by_key: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in named.items():
        name, _, sk = k.partition("::")
        by_key.setdefault(sk, {})[name] = v
    out: dict[str, torch.Tensor] = {}
    for sk, tensors in by_key.items():
        if sk == "step":  # a scalar per parameter
            for name, v in tensors.items():
                target = upcycled_name(name, config)
                out[f"{target[0] if target else name}::step"] = v
        else:
            out.update({f"{n}::{sk}": v for n, v in upcycle_named_tensors(tensors, config).items()})
    return out


@torch.no_grad()
def init_router(layer: MoE, how: str = "lecun", std: float | None = None,
                generator: torch.Generator | None = None) -> None:
    """(Re-)initialise the router weight of one MoE layer (no-op for parameter-free routers)."""
    if how not in ROUTER_INITS:
        raise ConfigError(f"router_init={how!r} must be one of {ROUTER_INITS}")
    w = getattr(layer.router, "weight", None)
    if w is None:
        return
    D = w.shape[1]
    if how == "zero":
        w.zero_()
    elif how == "linear":  # nn.Linear default: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))
        bound = 1.0 / math.sqrt(D)
        w.copy_(torch.rand(w.shape, generator=generator) * 2 * bound - bound)
    else:
        s = (1.0 / math.sqrt(D)) if how == "lecun" else (0.02 if std is None else std)
        if s < 0:
            raise ConfigError(f"router_init_std={s} must be >= 0")
        w.copy_(torch.randn(w.shape, generator=generator) * s)


def upcycle(model: VisionTransformer, *, num_experts: int, top_k: int = 2, moe_layers: Any = "every_2",
            router_init: str = "lecun", router_init_std: float | None = None, expert_noise: float = 0.0,
            seed: int = 0, **moe_options: Any) -> VisionTransformer:
    """Upcycle a dense moevision ViT: experts = copies of the dense MLP, everything else copied, new routers.

    ``moe_options`` are ViTConfig MoE fields (``MOE_OPTIONS``); defaults ``UPCYCLE_DEFAULTS`` (renormalised
    top-k, dropless) make the result equal the dense model at step 0 when ``expert_noise == 0``.
    """
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"upcycle expects a moevision VisionTransformer, got {type(model).__name__}")
    if expert_noise < 0:
        raise ConfigError(f"expert_noise={expert_noise} must be >= 0")
    if router_init not in ROUTER_INITS:
        raise ConfigError(f"router_init={router_init!r} must be one of {ROUTER_INITS}")
    cfg = upcycled_config(model.config, num_experts=num_experts, top_k=top_k, moe_layers=moe_layers, **moe_options)
    gen = torch.Generator().manual_seed(int(seed))
    dtype = next(model.parameters()).dtype
    moe = VisionTransformer(cfg).to(dtype)  # the parent's dtype before loading: copies are bit-exact (fp64 too)
    dense_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = upcycle_named_tensors(dense_state, cfg, expert_noise=expert_noise, generator=gen)
    for i in cfg.moe_block_indices:
        layer = moe.blocks[i].mlp
        init_router(layer, router_init, router_init_std, generator=gen)
        for k, v in layer.router.state_dict().items():
            state[f"blocks.{i}.mlp.router.{k}"] = v
    missing, unexpected = moe.load_state_dict(state, strict=False)
    if missing or unexpected:  # every tensor must land somewhere: no expert silently left at random init
        raise ConfigError(f"upcycle produced a state dict that does not fit the MoE model (missing "
                          f"{missing[:4]}, unexpected {unexpected[:4]})")
    moe.model_name = f"{getattr(model, 'model_name', None) or 'vit'}_upcycled"
    device = next(model.parameters()).device
    return moe.to(device=device)


def mlp_params(config: ViTConfig) -> int:
    """Parameters of one dense MLP of ``config`` (fc1 + fc2 with biases)."""
    D, F = config.embed_dim, int(config.embed_dim * config.mlp_ratio)
    return 2 * D * F + F + D


def expected_num_params(dense_params: int, config: ViTConfig) -> int:
    """dense + per MoE block (E - 1) * |MLP| + |router| (spec §4(e))."""
    E, D = config.num_experts, config.embed_dim
    router = E * D if config.router in ("topk", "expert_choice") else 0
    return dense_params + len(config.moe_block_indices) * ((E - 1) * mlp_params(config) + router)


@torch.no_grad()
def step0_gap(dense: nn.Module, moe: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Max absolute and relative logit difference between two models on ``x`` (both in eval mode)."""
    dense_mode, moe_mode = dense.training, moe.training
    dense.eval(), moe.eval()
    a, b = dense(x).logits, moe(x).logits
    dense.train(dense_mode), moe.train(moe_mode)
    diff = (a - b).abs().max().item()
    return {"max_abs": diff, "max_rel": diff / max(a.abs().max().item(), 1e-12)}


__all__ = ["ROUTER_INITS", "MOE_OPTIONS", "UPCYCLE_DEFAULTS", "upcycle", "upcycled_config", "upcycle_named_tensors",
           "upcycled_name", "upcycle_optimizer_state",
           "init_router", "expected_num_params", "mlp_params", "step0_gap"]
