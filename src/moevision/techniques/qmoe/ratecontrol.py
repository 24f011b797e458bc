"""Rate control for QMoE ternary experts: meet a bits-per-parameter budget, choosing the knobs on
calibration data only (a project addition; QMoE itself has no rate target).

Two knobs lower the rate. The zero threshold tau (a weight rounds to hi only above tau * hi, to lo only
below tau * lo; QMoE: 0.5) makes more zeros. But GPTQ pushes every column's rounding error onto the
columns after it, so with a high tau the last columns fill up with nonzeros (on the default model at
tau = 0.95: 2-3% nonzero in the first quarter of the columns, 27-33% in the last), which the dictionary,
built for i.i.d. weights, codes badly. More dampening moves GPTQ toward round to nearest and spreads
less. So: for each dampening in ``DAMPS`` (QMoE's 0.1 first) the smallest tau of ``THRESHOLDS`` that
meets the budget is found by bisection (the rate falls as tau grows); of these candidates the one whose
logits on the calibration images are closest to the original model's (mean KL divergence) is kept.
No labels are used. Round to nearest has only tau.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from .calibrate import QMoEConfig, quantize_model
from .storage import compress_model, compression_stats

THRESHOLDS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
DAMPS = (0.1, 1.0, 10.0)


@dataclass
class Attempt:
    config: QMoEConfig
    model: torch.nn.Module  # the compressed model
    work: torch.nn.Module  # the same with dequantised ordinary experts
    results: dict
    stats: dict
    distortion: float | None = None


def build(model: torch.nn.Module, calib: list[torch.Tensor], q: QMoEConfig,
          log: Callable[[str], None] = lambda s: None) -> Attempt:
    work = copy.deepcopy(model)
    res = quantize_model(work, lambda: calib, q, log=log)
    out = compress_model(work, res, q)
    return Attempt(q, out, work, res, compression_stats(out))


@torch.no_grad()
def calibration_kl(reference: torch.nn.Module, model: torch.nn.Module, calib: list[torch.Tensor]) -> float:
    """Mean KL(reference || model) of the class distributions over the calibration images."""
    total, n = 0.0, 0
    for b in calib:
        p = F.log_softmax(reference(b).logits.float(), -1)
        q = F.log_softmax(model(b).logits.float(), -1)
        total += float(F.kl_div(q, p, log_target=True, reduction="sum"))
        n += b.shape[0]
    return total / max(n, 1)


def search(model: torch.nn.Module, calib: list[torch.Tensor], q: QMoEConfig, target_bits: float,
           log: Callable[[str], None] = lambda s: None) -> tuple[Attempt, dict]:
    """The attempt to keep and a record of the search (``candidates``: tau, damping, bits, KL)."""
    model.eval()
    taus = [t for t in THRESHOLDS if t >= q.zero_threshold] or [q.zero_threshold]
    damps = [q.percdamp] if q.method == "rtn" else [q.percdamp] + [d for d in DAMPS if d > q.percdamp]
    cache: dict[tuple[float, float], Attempt] = {}

    def attempt(tau: float, damp: float) -> Attempt:
        if (tau, damp) not in cache:
            a = build(model, calib, replace(q, zero_threshold=tau, percdamp=damp))
            cache[(tau, damp)] = a
            log(f"zero threshold {tau}, damping {damp}: {a.stats['bits_per_expert_param']:.3f} bits per expert parameter")
        return cache[(tau, damp)]

    meets = lambda a: a.stats["bits_per_expert_param"] <= target_bits  # noqa: E731
    met = []
    for damp in damps:
        if not meets(attempt(taus[-1], damp)):
            continue  # out of reach at this dampening
        lo, hi = 0, len(taus) - 1
        while lo < hi:  # the smallest tau that meets the budget
            mid = (lo + hi) // 2
            if meets(attempt(taus[mid], damp)):
                hi = mid
            else:
                lo = mid + 1
        met.append(attempt(taus[lo], damp))
    for a in met:
        a.model.eval()
        a.distortion = calibration_kl(model, a.model, calib)
    best = min(met, key=lambda a: a.distortion) if met else min(cache.values(), key=lambda a: a.stats["bits_per_expert_param"])
    record = {"target_met": bool(met), "candidates": [
        {"zero_threshold": a.config.zero_threshold, "percdamp": a.config.percdamp,
         "bits_per_expert_param": a.stats["bits_per_expert_param"], "calibration_kl": a.distortion}
        for a in cache.values()]}
    return best, record
