"""Routing analytics for vision MoE models: one pass over a data split, then statistics on the routing.

What V-MoE (Riquelme et al., NeurIPS 2021, §5 and App. E "routing analysis") looks at, for any of the
layer's routers: expert load, router entropy, dropped tokens, per-class expert affinity, the mutual
information I(class; expert) (Mod-Squad, Chen et al. 2023, vision_moe.md §14, as a metric here, not a
loss), per-patch expert maps, dead experts and how alike the experts' weights are.

The statistics are pure functions of tensors (tested on hand-made routings); ``collect_routing`` runs
the model once with ``MoE.record_routing`` switched on and ``summarize`` turns its record into
numbers. Conventions (stated, not from a paper):
- a token's *assignments* are the (token, expert) pairs a router makes. Load counts the kept ones (what
  the experts computed); class/position affinity and I(class; expert) count the router's choices
  (token choice: the top-k, dropped ones included, so they do not depend on the batch's capacity);
- expert choice has no per-token choice: its assignments are the kept ones and a dropped token is one
  no expert picked; a token's *primary* expert is the highest-gate expert that took it;
- soft MoE routes no token to an expert: it mixes tokens into slots. Its assignments are the combine
  mass per expert (how much of each token's output comes from each expert), the primary expert is the
  argmax of it, and the per-token dispatch mass (how much of each expert's input comes from each token)
  is reported too. Drops and dead experts do not apply (nothing is dropped; dispatch mass is uniform
  over experts by construction);
- the CLS token has no patch position; patch maps use patch tokens only, class statistics use all tokens.
Entropies and mutual information are in bits.

Shape legend: B images, N tokens per image (prefix + patches), P patches, T = B*N tokens, E experts,
K top-k, C classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..data import ImageDataset, iterate_batches, normalize, num_batches
from ..errors import MoEVisionError

# ------------------------------------------------------------------ statistics (pure functions)


def entropy_bits(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in bits of distributions along ``dim`` (normalised here; 0 log 0 = 0)."""
    p = p.double() / p.double().sum(dim, keepdim=True).clamp_min(1e-300)
    return -(p * torch.where(p > 0, p.log2(), torch.zeros_like(p))).sum(dim)


def expert_load(assign_TE: torch.Tensor) -> torch.Tensor:
    """Share of all assignments (or soft mass) that each expert gets, (E,), sums to 1."""
    total = assign_TE.double().sum(0)
    return total / total.sum().clamp_min(1e-300)


def load_cv(share_E: torch.Tensor) -> float:
    """Coefficient of variation of the expert load (0 = perfectly balanced)."""
    share_E = share_E.double()
    return float(share_E.std(unbiased=False) / share_E.mean().clamp_min(1e-300))


def router_entropy_bits(probs_TE: torch.Tensor) -> float:
    """Mean per-token entropy (bits) of the router's distribution over experts (max log2 E)."""
    return float(entropy_bits(probs_TE, -1).mean())


def drop_rates(chosen_TE: torch.Tensor, kept_TE: torch.Tensor) -> tuple[float, float]:
    """(fraction of chosen assignments dropped, fraction of tokens with no kept assignment)."""
    chosen, kept = float(chosen_TE.double().sum()), float(kept_TE.double().sum())
    assign = 1.0 - kept / chosen if chosen > 0 else 0.0
    return assign, float(dropped_tokens(kept_TE).double().mean())


def dropped_tokens(kept_TE: torch.Tensor) -> torch.Tensor:
    """(T,) bool: tokens no expert processed (they keep only the residual path)."""
    return kept_TE.sum(-1) <= 0


def joint_counts(labels_T: torch.Tensor, weight_TE: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(C, E) co-occurrence mass of labels (class, or patch position) and experts."""
    onehot = torch.nn.functional.one_hot(labels_T.long(), num_labels).double()
    return onehot.t() @ weight_TE.double()


def conditional(counts_CE: torch.Tensor) -> torch.Tensor:
    """P(expert | label): rows of the joint counts normalised (rows without mass stay 0)."""
    counts_CE = counts_CE.double()
    return counts_CE / counts_CE.sum(1, keepdim=True).clamp_min(1e-300)


def mutual_information_bits(counts_CE: torch.Tensor) -> float:
    """I(label; expert) in bits from joint counts: sum P(c,e) log2(P(c,e) / (P(c) P(e)))."""
    p = counts_CE.double() / counts_CE.double().sum().clamp_min(1e-300)
    pc, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    ratio = torch.where(p > 0, p / (pc * pe).clamp_min(1e-300), torch.ones_like(p))
    return float((p * ratio.log2()).sum().clamp_min(0.0))


def dead_experts(share_E: torch.Tensor, threshold: float = 0.05) -> list[int]:
    """Experts whose share of the assignments is below ``threshold`` x the uniform share 1/E
    (0 = only experts never chosen; default 0.05: fewer than 5% of a fair share)."""
    E = share_E.numel()
    return [e for e in range(E) if float(share_E[e]) <= 0 or float(share_E[e]) < threshold / E]


def expert_weight_similarity(weights: list[torch.Tensor]) -> torch.Tensor:
    """(E, E) cosine similarity between experts, each flattened into one vector of all its weights
    (``weights``: tensors with the expert axis first, e.g. w1 (E, D, F), w2 (E, F, D), b1, b2)."""
    flat_EX = torch.cat([w.detach().double().reshape(w.shape[0], -1) for w in weights], dim=1)
    unit = flat_EX / flat_EX.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return unit @ unit.t()


def patch_expert_frequency(primary_BN: torch.Tensor, num_prefix: int, num_experts: int) -> torch.Tensor:
    """(P, E): how often each expert is the primary expert of each patch position (patch tokens only)."""
    patches_BP = primary_BN[:, num_prefix:]
    B, P = patches_BP.shape
    pos = torch.arange(P).expand(B, P).reshape(-1)
    e = patches_BP.reshape(-1)
    ok = e >= 0  # -1: the token was taken by no expert (expert choice)
    counts = torch.zeros(P, num_experts, dtype=torch.float64)
    return counts.index_put_((pos[ok], e[ok]), torch.ones(int(ok.sum()), dtype=torch.float64), accumulate=True)


def image_purity(primary_BP: torch.Tensor, num_experts: int) -> float:
    """Mean over images of the share of an image's tokens that go to its most common expert (1 when
    every image is routed as a whole; about the largest expert share when tokens are routed
    independently of their image). Tokens taken by no expert (-1) count in no expert's share."""
    valid = (primary_BP >= 0).double()
    counts_BE = torch.zeros(primary_BP.shape[0], num_experts, dtype=torch.float64)
    counts_BE.scatter_add_(1, primary_BP.clamp_min(0).long(), valid)
    return float((counts_BE.amax(1) / counts_BE.sum(1).clamp_min(1)).mean())


def shuffled_image_purity(primary_BP: torch.Tensor, num_experts: int, seed: int = 0) -> float:
    """``image_purity`` after shuffling each patch position's experts across images: the same per-position
    statistics with the link between an image's tokens broken (the baseline for ``image_purity``)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.argsort(torch.rand(primary_BP.shape, generator=g), dim=0)
    return image_purity(primary_BP.gather(0, perm), num_experts)


# ------------------------------------------------------------------ one pass over a split


@dataclass
class LayerRouting:
    """Routing of one MoE layer over B images of N tokens. Token choice fills ``expert_idx``/``gates``/
    ``kept`` (B, N, K); expert choice fills ``gates`` (B, N, E) (0 = not taken); soft MoE ``gates``
    (combine mass) and ``dispatch`` (B, N, E)."""

    block: int
    router: str
    num_experts: int
    top_k: int
    capacity_factor: float | None  # the layer's evaluation capacity factor (None = dropless)
    gates: torch.Tensor
    probs: torch.Tensor  # (B, N, E)
    expert_idx: torch.Tensor | None = None
    kept: torch.Tensor | None = None
    dispatch: torch.Tensor | None = None
    similarity: torch.Tensor | None = None  # (E, E) expert weight cosine

    @property
    def kind(self) -> str:
        return "soft" if self.dispatch is not None else ("token" if self.expert_idx is not None else "expert")

    def _dense(self, mask: torch.Tensor) -> torch.Tensor:
        B, N, K = self.expert_idx.shape
        out = torch.zeros(B * N, self.num_experts, dtype=torch.float64)
        rows = torch.arange(B * N).repeat_interleave(K)
        return out.index_put_((rows, self.expert_idx.reshape(-1)), mask.reshape(-1).double(), accumulate=True)

    def kept_TE(self) -> torch.Tensor:
        """(T, E) assignments the experts computed (soft: combine mass)."""
        if self.kind == "token":
            return self._dense(self.kept)
        if self.kind == "expert":
            return (self.gates > 0).double().reshape(-1, self.num_experts)
        return self.gates.double().reshape(-1, self.num_experts)

    def chosen_TE(self) -> torch.Tensor:
        """(T, E) the router's choices (token choice: top-k incl. dropped; else as ``kept_TE``)."""
        return self._dense(torch.ones_like(self.kept)) if self.kind == "token" else self.kept_TE()

    def primary_BN(self) -> torch.Tensor:
        """(B, N) each token's primary expert; -1 for an expert-choice token no expert took."""
        if self.kind == "token":
            return self.expert_idx[..., 0]
        top = self.gates.argmax(-1)
        return torch.where(self.gates.amax(-1) > 0, top, -1) if self.kind == "expert" else top

    def dropped_BN(self) -> torch.Tensor:
        """(B, N) bool: tokens no expert processed (all False for soft MoE)."""
        B, N = self.gates.shape[:2]
        if self.kind == "soft":
            return torch.zeros(B, N, dtype=torch.bool)
        return dropped_tokens(self.kept_TE()).view(B, N)


@dataclass
class RoutingRecord:
    """Everything one pass recorded: per-layer routing, labels, predictions, and the routed images."""

    layers: list[LayerRouting]
    labels: torch.Tensor  # (B,)
    preds: torch.Tensor  # (B,)
    class_names: tuple[str, ...]
    num_prefix_tokens: int
    grid_size: int | None  # patches form a grid_size x grid_size grid (None: unknown layout)
    images: torch.Tensor  # (B, C, H, W) the routed images (the data set's tensor, uint8 or [0, 1] float)
    dataset: str = ""
    batch_size: int | None = None  # images per forward pass (the routing group unless group_size is set)

    def image(self, i: int) -> torch.Tensor:
        """Image ``i`` as float (C, H, W) in [0, 1]."""
        x = self.images[i]
        return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()

    def one_per_class(self, n: int) -> list[int]:
        """Indices of the first image of each class (in class order), then the next images, n in all."""
        firsts = [int(torch.nonzero(self.labels == c)[0]) for c in range(len(self.class_names))
                  if bool((self.labels == c).any())][:n]
        taken = set(firsts)
        rest = [i for i in range(min(len(self.labels), 2 * n)) if i not in taken]
        return (firsts + rest)[:n]


def _moe_modules(model) -> list:
    from ..moe import MoE

    return [m for m in model.modules() if isinstance(m, MoE)]


def _expert_weights(moe) -> list[torch.Tensor]:
    ex = moe.experts
    return [getattr(ex, n) for n in ("w1", "w2", "w3", "b1", "b2") if hasattr(ex, n)]


@torch.no_grad()
def collect_routing(model, dataset: ImageDataset, *, batch_size: int = 500, device="cpu",
                    progress: bool = False) -> RoutingRecord:
    """Run ``model`` (eval mode) over ``dataset`` once, recording every MoE layer's per-token routing.

    Recording is switched on for the pass only (``MoE.record_routing``) and restored afterwards.
    Routing groups are the batches, as in ``evaluate``: with a capacity, drops depend on ``batch_size``.
    """
    device = torch.device(device)
    moes = _moe_modules(model)
    was_training, saved = model.training, [m.record_routing for m in moes]
    model.eval()
    for m in moes:
        m.record_routing = True
    parts: list[dict[str, list]] = []
    labels, preds, meta = [], [], None
    try:
        it = iterate_batches(dataset, batch_size, shuffle=False, device=device)
        for images, y in tqdm(it, total=num_batches(len(dataset), batch_size), desc="routing", leave=False,
                              disable=not progress, dynamic_ncols=True):
            out = model(normalize(images, dataset.mean, dataset.std))
            labels.append(y.cpu())
            preds.append(out.logits.argmax(-1).cpu())
            if meta is None:
                meta = list(out.moe_layers)
                parts = [{k: [] for k in ("gates", "probs", "expert_idx", "kept", "dispatch")} for _ in meta]
            for part, st in zip(parts, out.routing):
                if st.gates is None:
                    raise MoEVisionError("an MoE layer returned no per-token routing although recording was on; "
                                         "this block type does not pass RoutingStats through")
                for k in part:
                    v = getattr(st, k)
                    if v is not None:
                        part[k].append(v.detach().float().cpu() if v.is_floating_point() else v.cpu())
    finally:
        model.train(was_training)
        for m, s in zip(moes, saved):
            m.record_routing = s
    if meta is None:
        raise MoEVisionError(f"data set {dataset.name} is empty: nothing to analyse")
    blocks = getattr(model, "blocks", None)
    layers = []
    for blk, part in zip(meta, parts):
        moe = blocks[blk].mlp if blocks is not None else moes[len(layers)]
        cat = {k: (torch.cat(v) if v else None) for k, v in part.items()}
        layers.append(LayerRouting(
            block=blk, router=moe.router_name, num_experts=moe.num_experts,
            top_k=cat["expert_idx"].shape[-1] if cat["expert_idx"] is not None else 0,
            capacity_factor=getattr(moe.router, "eval_capacity_factor", None), gates=cat["gates"],
            probs=cat["probs"], expert_idx=cat["expert_idx"], kept=cat["kept"], dispatch=cat["dispatch"],
            similarity=expert_weight_similarity(_expert_weights(moe)).float()))
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    N = layers[0].gates.shape[1] if layers else None
    if grid is not None and N is not None and N != prefix + grid * grid:
        grid = None
    return RoutingRecord(layers=layers, labels=torch.cat(labels), preds=torch.cat(preds),
                         class_names=tuple(dataset.class_names), num_prefix_tokens=prefix, grid_size=grid,
                         images=dataset.images, dataset=dataset.name, batch_size=batch_size)


# ------------------------------------------------------------------ the numbers a report shows


def summarize_layer(layer: LayerRouting, labels_B: torch.Tensor, num_classes: int, num_prefix: int,
                    grid_size: int | None, dead_threshold: float = 0.05, batch_size: int | None = None) -> dict:
    """JSON-ready statistics of one layer (see the module docstring for the conventions). With
    ``batch_size`` the dropped-token rate is also split by the image's half of its batch: with priority
    by position (V-MoE's default) images late in a routing group lose their tokens first."""
    E = layer.num_experts
    B, N = layer.gates.shape[:2]
    kept, chosen = layer.kept_TE(), layer.chosen_TE()
    share = expert_load(kept)
    labels_T = labels_B.repeat_interleave(N)
    counts_CE = joint_counts(labels_T, chosen, num_classes)
    primary = layer.primary_BN()
    soft = layer.kind == "soft"
    s: dict = {
        "block": layer.block, "router": layer.router, "kind": layer.kind, "num_experts": E, "top_k": layer.top_k,
        "eval_capacity_factor": layer.capacity_factor, "tokens": B * N,
        "load_share": share.tolist(), "choice_share": expert_load(chosen).tolist(), "load_cv": load_cv(share),
        "load_entropy_bits": float(entropy_bits(share)),
        "max_entropy_bits": math.log2(E), "router_entropy_bits": router_entropy_bits(layer.probs.reshape(-1, E)),
        "mean_top_prob": float(layer.probs.double().amax(-1).mean()),
        "class_expert": conditional(counts_CE).tolist(), "class_share": (counts_CE.sum(1) / counts_CE.sum()).tolist(),
        "mi_class_bits": mutual_information_bits(counts_CE),
        "class_entropy_bits": float(entropy_bits(counts_CE.sum(1))),
        "expert_entropy_bits": float(entropy_bits(counts_CE.sum(0))),
        "dead_experts": [] if soft else dead_experts(share, dead_threshold), "dead_threshold": dead_threshold,
        "similarity": layer.similarity.tolist() if layer.similarity is not None else None,
        "not_applicable": [],
    }
    if soft:
        s["not_applicable"] = ["dropped tokens (soft MoE drops nothing)",
                               "dead experts (every slot takes a convex mix of tokens)",
                               "per-expert dispatch load (uniform by construction; load shows combine mass)"]
        s["assignment_drop_rate"] = s["token_drop_rate"] = None
    else:  # expert choice has no per-token choice: only tokens no expert took count as dropped
        s["assignment_drop_rate"], s["token_drop_rate"] = drop_rates(chosen, kept)
        if layer.kind == "expert":
            s["assignment_drop_rate"] = None
        lost_B = layer.dropped_BN().double().mean(1)  # fraction of each image's tokens dropped
        per_class = joint_counts(labels_B, lost_B[:, None], num_classes)[:, 0]
        s["class_drop_rate"] = (per_class / torch.bincount(labels_B, minlength=num_classes).clamp_min(1)).tolist()
        if batch_size and B > 1:
            i = torch.arange(B)
            start = i // batch_size * batch_size
            late = (i - start) >= (torch.clamp(B - start, max=batch_size) / 2)  # 2nd half of its own batch
            s["drop_rate_batch_halves"] = [float(lost_B[~late].mean()), float(lost_B[late].mean()) if late.any()
                                           else 0.0]
    if num_prefix > 0:
        cls = primary[:, 0]
        s["cls_primary_share"] = (torch.bincount(cls[cls >= 0], minlength=E).double() / max(B, 1)).tolist()
    if grid_size is not None:
        P = grid_size * grid_size
        freq_PE = patch_expert_frequency(primary, num_prefix, E)
        s["grid_size"] = grid_size
        s["patch_mode"] = freq_PE.argmax(1).tolist()
        s["patch_mode_share"] = (freq_PE.amax(1) / freq_PE.sum(1).clamp_min(1e-300)).tolist()
        s["patch_expert"] = conditional(freq_PE).tolist()
        pos_T = torch.arange(P).repeat(B)
        patch_chosen = chosen.view(B, N, E)[:, num_prefix:].reshape(-1, E)
        s["mi_position_bits"] = mutual_information_bits(joint_counts(pos_T, patch_chosen, P))
        s["image_purity"] = image_purity(primary[:, num_prefix:], E)
        s["image_purity_shuffled"] = shuffled_image_purity(primary[:, num_prefix:], E)
        if num_prefix > 0:  # does the CLS token go where most of its image's patches go?
            counts_BE = torch.zeros(B, E, dtype=torch.float64).scatter_add_(
                1, primary[:, num_prefix:].clamp_min(0), (primary[:, num_prefix:] >= 0).double())
            s["cls_with_image_majority"] = float((primary[:, 0] == counts_BE.argmax(1)).double().mean())
        s["position_entropy_bits"] = math.log2(P)
        if not soft:
            s["patch_drop_rate"] = layer.dropped_BN()[:, num_prefix:].double().mean(0).tolist()
        else:
            disp = layer.dispatch.double()[:, num_prefix:]  # (B, P, E) dispatch mass of each patch
            s["patch_dispatch"] = (disp.mean(0)).tolist()
    return s


def summarize(record: RoutingRecord, *, dead_threshold: float = 0.05) -> dict:
    """JSON-ready statistics of every layer plus the pass itself (images, accuracy)."""
    C = len(record.class_names)
    return {
        "dataset": record.dataset, "images": int(record.labels.numel()), "class_names": list(record.class_names),
        "accuracy": float((record.preds == record.labels).double().mean()) if record.labels.numel() else None,
        "num_prefix_tokens": record.num_prefix_tokens, "grid_size": record.grid_size,
        "layers": [summarize_layer(l, record.labels, C, record.num_prefix_tokens, record.grid_size, dead_threshold,
                                   record.batch_size) for l in record.layers],
    }
