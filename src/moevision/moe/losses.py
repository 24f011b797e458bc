"""Auxiliary losses of sparse MoE layers, as pure functions of what the router returns.

- ``importance_cv2``: V-MoE / Shazeer et al. 2017 importance loss, CV² of the summed clean softmax.
- ``load_cv2``: V-MoE smooth load loss with noisy gating (needs noise std > 0); ``threshold_mode`` picks
  vmoe's k-th-value threshold (default) or Shazeer et al. 2017's in/out thresholds (``prob_in_top_k``).
- ``switch_loss``: Switch / GShard load balancing, E * sum_e f_e P_e (1 at perfect balance).
- ``z_loss``: router z-loss (ST-MoE), mean squared log-sum-exp of the logits.

All take per-group tensors (G, S, E), compute per group and average over groups, as vmoe does.
CV²(v) = var(v) / (mean(v)² + eps) with the population variance (ddof=0).
"""

from __future__ import annotations

import math

import torch


def cv_squared(v: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """CV² over the last axis (population variance), shape v.shape[:-1]."""
    mean = v.mean(dim=-1)
    var = v.var(dim=-1, unbiased=False)
    return var / (mean * mean + eps)


def importance_cv2(probs_GSE: torch.Tensor) -> torch.Tensor:
    """CV² of Imp_e = sum over the group's tokens of the (clean) router probability of expert e."""
    return cv_squared(probs_GSE.sum(dim=1)).mean()


LOAD_THRESHOLDS = ("kth", "shazeer_in_out")


def prob_in_top_k(clean: torch.Tensor, noisy: torch.Tensor, noise_std, top_k: int,
                  threshold_mode: str = "kth") -> torch.Tensor:
    """The smooth load p_e(x) = 1 - Phi((eta(x) - l_e(x)) / sigma) = Phi((l_e(x) - eta(x)) / sigma) over the
    last axis (the E experts): the probability that expert e is in x's top-k when only e's noise is
    resampled, l_e the clean logit. ``noise_std`` is a float or a tensor broadcasting against the logits
    (Shazeer's learned per-token noise).

    ``threshold_mode``: ``kth`` (vmoe): eta(x) is the k-th largest *noisy* logit, for every expert.
    ``shazeer_in_out`` (Shazeer et al. 2017's ``_prob_in_top_k``, M³ViT's and ShiftAddViT's gates): for an
    expert in x's top-k now the bar is the (k+1)-th largest noisy logit (the one it would have to fall
    below), for the others the k-th; with k = E every expert is always in (p = 1)."""
    if threshold_mode not in LOAD_THRESHOLDS:
        raise ValueError(f"threshold_mode must be one of {LOAD_THRESHOLDS}, got {threshold_mode!r}")
    E = clean.shape[-1]
    if threshold_mode == "kth":
        eta = noisy.topk(top_k, dim=-1).values[..., -1:]
    elif top_k >= E:
        return torch.ones_like(clean)
    else:
        top = noisy.topk(top_k + 1, dim=-1).values
        thr_in, thr_out = top[..., top_k:top_k + 1], top[..., top_k - 1:top_k]
        eta = torch.where(noisy > thr_in, thr_in, thr_out)
    z = (eta - clean) / noise_std
    return 1.0 - 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))  # 1 - Phi(z)


def load_cv2(
    clean_logits_GSE: torch.Tensor,
    noisy_logits_GSE: torch.Tensor,
    noise_std: float,
    top_k: int,
    threshold_mode: str = "kth",
) -> torch.Tensor:
    """CV² of the smooth load ``Load_e = mean over the group's tokens of prob_in_top_k`` (V-MoE's load loss with
    the default ``threshold_mode="kth"``; ``"shazeer_in_out"``: Shazeer et al. 2017's thresholds, see
    ``prob_in_top_k``)."""
    if noise_std <= 0:
        raise ValueError(f"load_cv2 needs noise_std > 0, got {noise_std}")
    p = prob_in_top_k(clean_logits_GSE, noisy_logits_GSE, noise_std, top_k, threshold_mode)
    return cv_squared(p.mean(dim=1)).mean()


def switch_loss(probs_GSE: torch.Tensor, expert_idx_GSK: torch.Tensor, *, use_all_k: bool = False) -> torch.Tensor:
    """E * sum_e f_e * P_e, f_e = fraction of tokens whose top-1 (or any top-k) choice is e, before drops."""
    num_experts = probs_GSE.shape[-1]
    idx = expert_idx_GSK if use_all_k else expert_idx_GSK[..., :1]
    counts = torch.zeros_like(probs_GSE[:, 0, :]).scatter_add_(
        1, idx.reshape(idx.shape[0], -1), torch.ones_like(idx.reshape(idx.shape[0], -1), dtype=probs_GSE.dtype)
    )
    f = counts / idx.shape[1] / idx.shape[2]  # (G, E)
    p = probs_GSE.mean(dim=1)  # (G, E)
    return (num_experts * (f * p).sum(dim=-1)).mean()


def z_loss(logits_GSE: torch.Tensor) -> torch.Tensor:
    """mean over tokens of (logsumexp_e logits)²."""
    return logits_GSE.logsumexp(dim=-1).square().mean()


def router_entropy(probs_GSE: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the per-token distribution over experts."""
    p = probs_GSE.clamp_min(1e-12)
    return -(probs_GSE * p.log()).sum(dim=-1).mean()
