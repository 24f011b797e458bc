"""Fewer experts instead of fewer bits: prune rarely used experts by routing statistics, or merge
experts into fewer by weight averaging (the alternatives the QMoE issue asks to compare).

- **Pruning**: keep the ``num_keep`` most used experts of every MoE layer (usage = kept assignments
  on calibration data) and drop the others' router rows and weights. The router's softmax then runs
  over the kept experts only, so top-k semantics stay intact: a token whose chosen experts are all kept
  goes to the same experts; its gates are renormalised over the kept experts (identical outputs when
  the layer renormalises its top-k gates, ``normalize_topk``). A token whose expert was pruned goes to
  its best kept expert.
- **Merging** (EWA-style, after Huang et al. 2023, "Experts Weights Averaging", arXiv 2308.06093, which
  averages all experts into one; here groups of them): experts are grouped greedily by the cosine
  similarity of their flattened weights (average linkage) and each group is averaged, weighted by
  usage (``weighting="usage"``) or uniformly; the group's router row is the same weighted average of
  its members' rows (``router="mean"``) or the most used member's row (``router="top"``). [R]: the
  issue names no grouping rule; these are options.

Both return an ordinary moevision ViT with ``num_experts`` reduced (same count in every MoE layer, as
the config has one ``num_experts``), saved with ``save_pretrained``.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch

from ...errors import ConfigError
from .calibrate import moe_layers


@torch.no_grad()
def expert_usage(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Kept assignments per expert of every MoE layer over ``batches`` (eval mode), {layer: (E,)}."""
    was = model.training
    model.eval()
    usage: dict[str, torch.Tensor] = {}
    hooks = []
    for name, moe in moe_layers(model):
        def hook(mod, args, out, name=name):
            usage[name] = usage.get(name, 0) + out.stats.tokens_per_expert.float().cpu()
        hooks.append(moe.register_forward_hook(hook))
    try:
        for b in batches:
            model(b)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return usage


def _rebuild(model: torch.nn.Module, num_experts: int, layer_state) -> torch.nn.Module:
    """A copy of the ViT with ``num_experts`` per MoE layer; ``layer_state(name, key, tensor)`` gives
    each MoE tensor's new value."""
    from ...models.vit import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"pruning / merging rebuilds a moevision VisionTransformer, got {type(model).__name__}")
    cfg = copy.deepcopy(model.config)
    cfg.num_experts = num_experts
    cfg.top_k = min(cfg.top_k, num_experts)
    new = VisionTransformer(cfg)
    names = [n for n, _ in moe_layers(model)]
    state = {}
    for k, v in model.state_dict().items():
        owner = next((n for n in names if k.startswith(n + ".")), None)
        state[k] = layer_state(owner, k[len(owner) + 1:], v) if owner is not None else v
    new.load_state_dict(state)
    new.model_name = getattr(model, "model_name", None)
    new.train(model.training)
    return new.to(next(model.parameters()).device)


def _check_count(model, n: int, what: str) -> None:
    if getattr(model.config, "task_routing", "none") != "none":
        raise ConfigError(f"expert pruning/merging does not handle task-dependent routers yet "
                          f"(model.task_routing={model.config.task_routing!r})")
    E = model.config.num_experts
    if not (isinstance(n, int) and 1 <= n < E):
        raise ConfigError(f"{what} must be an integer in [1, {E - 1}] (the model has {E} experts per layer), got {n!r}")


@torch.no_grad()
def prune_experts(model: torch.nn.Module, keep: dict[str, list[int]]) -> torch.nn.Module:
    """Keep experts ``keep[layer]`` (same number in every layer) of each MoE layer."""
    sizes = {len(v) for v in keep.values()}
    if len(sizes) != 1 or set(keep) != {n for n, _ in moe_layers(model)}:
        raise ConfigError("prune_experts needs a list of kept experts for every MoE layer, all of one length")
    _check_count(model, sizes.pop(), "experts kept")

    def layer_state(name, key, v):
        if key.startswith("router.weight") or key.startswith("experts."):
            return v[torch.tensor(sorted(keep[name]))].clone()
        return v
    return _rebuild(model, len(next(iter(keep.values()))), layer_state)


def prune_by_usage(model: torch.nn.Module, usage: dict[str, torch.Tensor], num_keep: int) -> tuple:
    """Prune every layer to its ``num_keep`` most used experts; returns (model, kept ids per layer)."""
    _check_count(model, num_keep, "--keep")
    keep = {n: sorted(torch.argsort(u, descending=True, stable=True)[:num_keep].tolist()) for n, u in usage.items()}
    return prune_experts(model, keep), keep


def similarity_groups(moe, num_groups: int) -> list[list[int]]:
    """Greedy average-linkage clustering of a layer's experts by cosine similarity of their weights."""
    ex = moe.experts
    flat = torch.cat([p.detach().reshape(ex.num_experts, -1) for p in ex.parameters()], 1).float()
    flat = torch.nn.functional.normalize(flat, dim=1)
    sim = flat @ flat.T
    groups = [[e] for e in range(ex.num_experts)]
    while len(groups) > num_groups:
        best, pair = -float("inf"), (0, 1)
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                s = float(sim[groups[i]][:, groups[j]].mean())
                if s > best:
                    best, pair = s, (i, j)
        i, j = pair
        groups[i] = sorted(groups[i] + groups[j])
        del groups[j]
    return groups


@torch.no_grad()
def merge_experts(model: torch.nn.Module, groups: dict[str, list[list[int]]],
                  usage: dict[str, torch.Tensor] | None = None, *, weighting: str = "usage",
                  router: str = "mean") -> torch.nn.Module:
    """Average each group of experts into one expert (weights, biases and router rows)."""
    if weighting not in ("usage", "uniform"):
        raise ConfigError(f"merge weighting must be 'usage' or 'uniform', got {weighting!r}")
    if router not in ("mean", "top"):
        raise ConfigError(f"merge router must be 'mean' or 'top', got {router!r}")
    if weighting == "usage" or router == "top":
        if usage is None:
            raise ConfigError("usage-weighted merging needs routing statistics (usage)")
    sizes = {len(g) for g in groups.values()}
    if len(sizes) != 1:
        raise ConfigError("merge_experts needs the same number of groups in every MoE layer")
    n = sizes.pop()
    _check_count(model, n, "--merge-to")

    def weights(name, g):
        u = usage[name][g] if weighting == "usage" else torch.ones(len(g))
        u = u.clamp_min(0) + 1e-6  # an unused group still gets a defined average
        return u / u.sum()

    def layer_state(name, key, v):
        if not (key.startswith("router.weight") or key.startswith("experts.")):
            return v
        rows = []
        for g in groups[name]:
            if key.startswith("router.") and router == "top":
                rows.append(v[g[int(torch.argmax(usage[name][g]))]])
            else:
                w = weights(name, g).to(v.dtype).view(-1, *([1] * (v.dim() - 1)))
                rows.append((v[g] * w).sum(0))
        return torch.stack(rows)
    return _rebuild(model, n, layer_state)


def merge_by_similarity(model: torch.nn.Module, usage: dict[str, torch.Tensor] | None, num_out: int, **kw) -> tuple:
    """Group each layer's experts into ``num_out`` by similarity and merge; returns (model, groups)."""
    _check_count(model, num_out, "--merge-to")
    groups = {n: similarity_groups(m, num_out) for n, m in moe_layers(model)}
    return merge_experts(model, groups, usage, **kw), groups
