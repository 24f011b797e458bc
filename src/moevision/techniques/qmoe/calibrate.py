"""QMoE's calibration flow: route real data through the model, give every expert the Hessian of the
tokens it receives, quantise layer by layer (Frantar & Alistarh 2023; spec §1 B1 [V]).

For each MoE layer in order, calibration images run through the model with hooks on the MoE layer
(its input) and on its router (the routing plan); the kept (token, expert) assignments say which
tokens each expert processes, exactly as the dispatch does (capacity drops included). Each expert's
first projection gets H = 2 X_e^T X_e / N_e; the second projection's inputs are the expert's hidden
activations (from the original first projection, or with ``true_sequential`` from the quantised one).
The quantised weights are written back before the next layer is calibrated (``sequential``), so later
layers see the quantised model, as in QMoE.

Deviations and options: calibration is images of the training split (QMoE: C4 text); the per-expert
token cap is ``max_tokens_mul`` * (calibration tokens) / E (QMoE: 4); experts with fewer than
``min_tokens`` tokens use ``fallback``: ``rtn`` (H = I, QMoE's choice for 0 tokens) or ``pooled`` (the
Hessian of all the layer's tokens). No tokens are excluded (QMoE drops sentinel tokens of T5).
Soft-MoE layers (no token-to-expert assignment) are not supported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch

from ...errors import ConfigError
from ...moe import MoE
from ...moe.experts import Experts
from ...moe.types import RoutingPlan
from .gptq import GRIDS, QuantResult, gptq, hessian, rtn

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "float8_e4m3fn": torch.float8_e4m3fn}


@dataclass
class QMoEConfig:
    """Options of the QMoE pass (defaults: QMoE's, except where the docstrings above say)."""

    bits: str = "ternary"  # "ternary" (sub-1-bit codec) | "2bit" (packed 4 per byte)
    method: str = "gptq"  # "gptq" | "rtn" (round to nearest, the baseline)
    percdamp: float = 0.1
    blocksize: int = 128
    actorder: bool = False
    true_sequential: bool = False
    sequential: bool = True
    max_tokens_mul: float = 4.0  # 0 = no cap
    min_tokens: int = 1
    fallback: str = "rtn"  # "rtn" | "pooled"
    zero_threshold: float = 0.5  # ternary rounding threshold as a fraction of hi / lo
    layout: str = "stream"  # codec layout: "stream" | "row"
    dictionary: str = "fixed"  # "fixed" (P(zero) = 0.885) | "fit" (each projection's zero fraction)
    scale_dtype: str = "bfloat16"
    bias_dtype: str = "bfloat16"

    def validate(self) -> None:
        def check(ok, field, why):
            if not ok:
                raise ConfigError(f"qmoe.{field}={getattr(self, field)!r} {why}")
        check(self.bits in GRIDS, "bits", f"must be one of {GRIDS}")
        check(self.method in ("gptq", "rtn"), "method", "must be 'gptq' or 'rtn'")
        check(self.percdamp >= 0, "percdamp", "must be >= 0")
        check(isinstance(self.blocksize, int) and self.blocksize >= 1, "blocksize", "must be a positive integer")
        check(self.max_tokens_mul >= 0, "max_tokens_mul", "must be >= 0 (0 = no cap)")
        check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "must be an integer >= 0")
        check(self.fallback in ("rtn", "pooled"), "fallback", "must be 'rtn' or 'pooled'")
        check(0.0 < self.zero_threshold < 1.0, "zero_threshold", "must be in (0, 1)")
        check(self.layout in ("stream", "row"), "layout", "must be 'stream' or 'row'")
        check(self.dictionary in ("fixed", "fit"), "dictionary", "must be 'fixed' or 'fit'")
        for f in ("scale_dtype", "bias_dtype"):
            check(getattr(self, f) in DTYPES, f, f"must be one of {sorted(DTYPES)}")

    def to_dict(self) -> dict:
        return asdict(self)


def moe_layers(model: torch.nn.Module) -> list[tuple[str, MoE]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]
    if not layers:
        raise ConfigError("the model has no MoE layers: nothing to compress")
    return layers


@torch.no_grad()
def gather_expert_inputs(model: torch.nn.Module, moe: MoE, batches: Iterable[torch.Tensor]) -> tuple[list, int]:
    """The tokens each expert of ``moe`` receives when ``batches`` run through ``model`` (eval mode):
    a list of (N_e, D) tensors (CPU, fp32) and the total number of tokens that reached the layer."""
    was = model.training
    model.eval()
    E = moe.num_experts
    xs: list[list[torch.Tensor]] = [[] for _ in range(E)]
    seen = {"x": None, "T": 0}

    def pre(mod, args):
        seen["x"] = args[0].reshape(-1, mod.dim)
        seen["T"] += seen["x"].shape[0]

    def post(mod, args, plan):
        if not isinstance(plan, RoutingPlan):
            raise ConfigError("QMoE calibration needs token-to-expert routing; soft MoE layers are not supported")
        tok, exp = plan.token_idx[plan.kept], plan.expert_idx[plan.kept]
        x = seen["x"].float().cpu()
        for e in range(E):
            xs[e].append(x[tok[exp == e].cpu()])

    hooks = [moe.register_forward_pre_hook(pre), moe.router.register_forward_hook(post)]
    try:
        for b in batches:
            model(b)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    D = moe.dim
    return [torch.cat(x) if x else torch.zeros(0, D) for x in xs], seen["T"]


def _hessians(xs: list[torch.Tensor], cfg: QMoEConfig) -> tuple[torch.Tensor, list[bool]]:
    H = torch.stack([hessian(x) for x in xs])
    few = [x.shape[0] < max(cfg.min_tokens, 1) for x in xs]
    if any(few):
        if cfg.fallback == "pooled" and sum(x.shape[0] for x in xs):
            pooled = hessian(torch.cat(xs))
            for e, f in enumerate(few):
                if f:
                    H[e] = pooled
        else:
            H[torch.tensor(few)] = 0.0  # zero Hessian -> H = I inside gptq (round to nearest)
    return H, few


def _quant(w_ERC: torch.Tensor, H: torch.Tensor | None, cfg: QMoEConfig) -> QuantResult:
    sd = DTYPES[cfg.scale_dtype]
    if cfg.method == "rtn" or H is None:
        return rtn(w_ERC, cfg.bits, sd, zero_threshold=cfg.zero_threshold)
    return gptq(w_ERC, H, cfg.bits, percdamp=cfg.percdamp, blocksize=cfg.blocksize, actorder=cfg.actorder,
                scale_dtype=sd, zero_threshold=cfg.zero_threshold)


@torch.no_grad()
def quantize_layer(moe: MoE, xs: list[torch.Tensor] | None, cfg: QMoEConfig) -> tuple[dict[str, QuantResult], dict]:
    """Quantise one layer's projections (``nn.Linear`` layout, (E, R, C)) given each expert's inputs
    (None for round to nearest). Returns the results per projection and a small report."""
    ex = moe.experts
    if not isinstance(ex, Experts):
        raise ConfigError(f"QMoE needs ordinary Experts, got {type(ex).__name__} (already compressed?)")
    w = {p: getattr(ex, p).detach().float().cpu().transpose(1, 2) for p in ("w1", "w2", "w3") if hasattr(ex, p)}
    info = {"tokens_per_expert": [int(x.shape[0]) for x in xs] if xs is not None else None}
    if xs is None or cfg.method == "rtn":
        return {p: _quant(v, None, cfg) for p, v in w.items()}, info
    H1, few = _hessians(xs, cfg)
    res = {"w1": _quant(w["w1"], H1, cfg)}
    if "w3" in w:
        res["w3"] = _quant(w["w3"], H1, cfg)
    src = {p: (res[p].q if cfg.true_sequential else w[p]) for p in res}
    b1 = ex.b1.detach().float().cpu() if ex.has_bias else None
    hs = []
    for e, x in enumerate(xs):
        h = x @ src["w1"][e].T + (b1[e] if b1 is not None else 0.0)
        h = ex.act(h) * (x @ src["w3"][e].T) if "w3" in src else ex.act(h)
        hs.append(h)
    H2, _ = _hessians(hs, cfg)
    res["w2"] = _quant(w["w2"], H2, cfg)
    info["fallback_experts"] = [e for e, f in enumerate(few) if f]
    info["failed_cholesky"] = sorted({e for r in res.values() for e in torch.nonzero(r.fallback).flatten().tolist()}
                                     - set(info["fallback_experts"]))
    return res, info


def write_dequantized(moe: MoE, res: dict[str, QuantResult]) -> None:
    """Put the quantised values into the (ordinary) experts, so later layers see the quantised model."""
    with torch.no_grad():
        for p, r in res.items():
            getattr(moe.experts, p).copy_(r.q.transpose(1, 2))


def quantize_model(model: torch.nn.Module, calib: Callable[[], Iterable[torch.Tensor]] | None,
                   cfg: QMoEConfig, *, log: Callable[[str], None] = lambda s: None) -> dict[str, tuple]:
    """QMoE over every MoE layer of ``model`` (modified in place: it ends up holding the dequantised
    weights). ``calib()`` yields normalised input batches (None only for round to nearest).
    Returns {layer name: (results per projection, report)}."""
    cfg.validate()
    layers = moe_layers(model)
    if cfg.method == "gptq" and calib is None:
        raise ConfigError("GPTQ needs calibration data")
    out = {}
    pre_gathered = {}
    if cfg.method == "gptq" and not cfg.sequential:  # every layer calibrated on the original model
        pre_gathered = {n: gather_expert_inputs(model, m, calib()) for n, m in layers}
    for name, moe in layers:
        xs = None
        if cfg.method == "gptq":
            xs, T = pre_gathered[name] if name in pre_gathered else gather_expert_inputs(model, moe, calib())
            if cfg.max_tokens_mul > 0:
                cap = max(int(cfg.max_tokens_mul * T / moe.num_experts), 1)
                xs = [x[:cap] for x in xs]
        res, info = quantize_layer(moe, xs, cfg)
        write_dequantized(moe, res)
        log(f"{name}: tokens per expert {info['tokens_per_expert']}")
        out[name] = (res, info)
    return out
