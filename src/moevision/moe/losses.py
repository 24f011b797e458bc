"""Auxiliary losses of sparse MoE layers, as pure functions of what the router returns.

- ``importance_cv2``: V-MoE / Shazeer et al. 2017 importance loss, CV² of the summed clean softmax.
- ``load_cv2``: V-MoE smooth load loss with noisy gating (needs noise std > 0).
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


def load_cv2(
    clean_logits_GSE: torch.Tensor,
    noisy_logits_GSE: torch.Tensor,
    noise_std: float,
    top_k: int,
) -> torch.Tensor:
    """CV² of the smooth load: p_e(x) = 1 - Phi((eta(x) - l_e(x)) / sigma).

    eta(x) is the k-th largest *noisy* logit of token x and l_e the clean logit (vmoe "kth" threshold):
    p_e(x) is the probability that expert e is in x's top-k when only e's noise is resampled.
    """
    if noise_std <= 0:
        raise ValueError(f"load_cv2 needs noise_std > 0, got {noise_std}")
    threshold = noisy_logits_GSE.topk(top_k, dim=-1).values[..., -1:]  # (G, S, 1)
    z = (threshold - clean_logits_GSE) / noise_std
    p = 1.0 - 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))  # 1 - Phi(z)
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
