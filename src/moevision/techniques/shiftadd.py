"""ShiftAddViT's mixture of multiplication primitives (You et al., NeurIPS 2023), vision_moe.md §12.

ShiftAddViT reparameterises a trained ViT with multiplication-free primitives. Its MLP linears become a
2-expert MoE of a **multiplication expert** (the original ``nn.Linear``) and a **shift expert**
(``ShiftLinear``: weights ±2^p, i.e. bit shifts), with a router per linear layer deciding per token.
The **latency-aware load-balancing loss** (LL-loss) balances the experts' *time* instead of their token
counts: with per-token costs α_e, ``L_LL = CV²(α ⊙ Imp) + CV²(α ⊙ Load)`` is minimal when α_e · n_e is
the same for every expert, i.e. token shares ∝ 1/α_e ("the faster the expert, the more tokens it gets").

What is here ([V] = read in GATECH-EIC/ShiftAddViT, pvt/):
- ``ShiftLinear`` [V, DeepShift's LinearShift]: parameters ``shift`` and ``sign``; the weight is
  ``2^round(shift) · sign(round(sign))`` with ``shift`` clamped to [-(2^(b-1) - 2), 0] ([-14, 0] for
  b = 5 weight bits), inputs and bias floored to fixed point (16 integer + 16 fraction bits),
  straight-through estimators for round / sign / fixed point. ``sign`` rounding to 0 gives a zero weight,
  as in DeepShift (a ternary sign). ``ShiftLinear.from_linear`` converts a dense layer
  (shift = round(log2 |W|), sign = sign(W)).
- ``NoisyGate`` [V]: Shazeer's noisy top-k with a learned noise std ``softplus(x W_noise) + 0.01`` (training
  only), gates = softmax over the top-k noisy logits, and the smooth load ``P(x -> e)`` (Shazeer's
  in/out thresholds). Its init is FastMoE's: ``kaiming_uniform_(a=√5)`` on the (D, E) weight, whose
  PyTorch fan-in is E (bound 1/√E); ``init="fan_in"`` uses fan-in D instead. ``NaiveGate`` [V]:
  ``Linear(d, E)`` with bias, no noise; with top-1 and the code's gate weight it gets no gradient at all
  (a warning says so).
- ``MoELinear``: a drop-in for ``nn.Linear`` whose experts are any modules of the same in/out width
  (heterogeneous: widths, quantisation levels, primitives), with ``latency_aware_loss`` as its aux loss.
- ``shiftadd_reparameterize``: a trained ``VisionTransformer``'s MLP linears (fc1, fc2; ``attention=True``
  also qkv and proj, the code's ``--moe_attn``) become ``MoELinear{Linear, ShiftLinear}`` (both experts
  initialised from the dense weight, as in the paper's step iii) or ``ShiftLinear`` alone (``mode="shift"``).

Deviations and options, stated:
- With top-1 the code's gate weight is softmax over one logit = 1, so the task loss gives the router no
  gradient; only the smooth load term of the LL-loss trains it. That is the default
  (``gate_weight="topk_softmax"``). ``gate_weight="straight_through"`` (ours) keeps the value 1 but passes
  the gradient of the chosen expert's full-softmax probability, so the router also learns from the task.
- The released ``engine.py`` sets the balance loss to 0; the paper trains with 0.01 · Σ_layers L_LL, which
  is what ``loss_weight`` (default 0.01) gives.
- α: the code's constants (α_mult = 6, α_shift = 4) are the default; they model GPU latencies of TVM shift
  kernels. Here the shift expert is an fp32 emulation (a float matmul with ±2^p weights), so CPU time is
  not lower; the experiment reports *modelled* latency from α and the measured token shares.
- Attention reparameterisation to binary Hamming codes and add kernels (the paper's step ii) is not built
  (the spec puts it out of scope).

Shape legend: T tokens, Din / Dout widths, E experts, K top-k.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..moe.losses import cv_squared
from ..moe.losses import prob_in_top_k as prob_in_top_k_core
from ..moe.types import MoEOutput


# ---------------------------------------------------------------------------------------------------
# straight-through primitives
def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity gradient."""
    return x + (torch.round(x) - x).detach()


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """sign(x) (0 at 0) forward, identity gradient."""
    return x + (torch.sign(x) - x).detach()


def round_fixed_ste(x: torch.Tensor, int_bits: int = 16, frac_bits: int = 16) -> torch.Tensor:
    """Floor to the fixed-point grid 2^-frac_bits, clamp to [-2^(int_bits-1), 2^(int_bits-1) - 2^-frac_bits]
    (DeepShift's ``round_to_fixed``), identity gradient."""
    delta = 2.0 ** -frac_bits
    bound = 2.0 ** (int_bits - 1)
    xf = x.float()  # in fp32: x / 2^-16 overflows fp16 from |x| >= 1
    q = torch.clamp(torch.floor(xf / delta) * delta, -bound, bound - delta)
    return x + (q.to(x.dtype) - x).detach()


# ---------------------------------------------------------------------------------------------------
# the shift expert
class ShiftLinear(nn.Module):
    """A linear layer with power-of-two weights, ``W = 2^round(shift) · sign(round(sign))``
    (DeepShift-PS as in ShiftAddViT's ``LinearShift``). ``weight_bits`` b gives shifts in
    [-(2^(b-1) - 2), 0]; ``act_bits = (integer, fraction)`` is the fixed point of inputs and bias
    (None: no rounding)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, weight_bits: int = 5,
                 act_bits: tuple[int, int] | None = (16, 16)):
        super().__init__()
        if not isinstance(weight_bits, int) or weight_bits < 2:
            raise ConfigError(f"weight_bits must be an integer >= 2, got {weight_bits!r}")
        if act_bits is not None and (len(act_bits) != 2 or min(act_bits) < 1):
            raise ConfigError(f"act_bits must be None or (integer_bits, fraction_bits) >= 1, got {act_bits!r}")
        self.in_features, self.out_features = in_features, out_features
        self.weight_bits, self.act_bits = weight_bits, None if act_bits is None else tuple(act_bits)
        self.shift_range = (-(2 ** (weight_bits - 1) - 2), 0)
        self.shift = nn.Parameter(torch.empty(out_features, in_features))
        self.sign = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        with torch.no_grad():  # DeepShift's init: uniform shifts over the range, random signs
            self.shift.uniform_(*self.shift_range)
            self.sign.uniform_(-1.0, 1.0)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kw) -> "ShiftLinear":
        """The nearest shift layer to ``linear``: shift = round(log2 |W|) (clamped), sign = sign(W); a
        weight of exactly ±2^p in range converts exactly, a zero weight gets sign 0."""
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, **kw)
        m = m.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lo, hi = m.shift_range
            m.shift.copy_(torch.log2(w.abs().clamp_min(2.0 ** (lo - 1))).round().clamp(lo, hi))
            m.sign.copy_(torch.sign(w))
            if m.bias is not None:
                m.bias.copy_(linear.bias.detach())
        return m

    def quantized_weight(self) -> torch.Tensor:
        """The effective weight (Dout, Din), differentiable through the straight-through estimators."""
        lo, hi = self.shift_range
        if self.training:  # DeepShift keeps the parameter itself in range (so it cannot drift away); on
            self.shift.data.clamp_(lo, hi)  # .data, so a second forward before backward stays valid
        p = round_ste(self.shift.clamp(lo, hi))
        return torch.pow(2.0, p) * sign_ste(round_ste(self.sign))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight()
        b = self.bias
        if self.act_bits is not None:
            x = round_fixed_ste(x, *self.act_bits)
            b = None if b is None else round_fixed_ste(b, *self.act_bits)
        return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"shift_range={self.shift_range}, act_bits={self.act_bits}")


# ---------------------------------------------------------------------------------------------------
# routers
class NaiveGate(nn.Module):
    """FastMoE's ``NaiveGate``: logits = Linear(d, E) with bias; top-k, gates = softmax over the top-k
    logits (1 for top-1). ``load`` is the hard count (no smooth load without noise)."""

    def __init__(self, dim: int, num_experts: int, top_k: int = 1):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = nn.Linear(dim, num_experts)

    def forward(self, x_TD: torch.Tensor):
        logits = F.linear(x_TD.float(), self.gate.weight.float(), self.gate.bias.float())  # fp32, as the core
        return logits, logits, None


class NoisyGate(nn.Module):
    """Shazeer et al. (2017) noisy top-k gating with a learned per-token noise std,
    ``softplus(x W_noise) + noise_epsilon`` (training only); ``W_gate``, ``W_noise`` Kaiming-uniform."""

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, noise_epsilon: float = 1e-2, init: str = "code"):
        super().__init__()
        if init not in ("code", "fan_in"):
            raise ConfigError(f"init must be 'code' or 'fan_in', got {init!r}")
        self.num_experts, self.top_k, self.noise_epsilon = num_experts, top_k, noise_epsilon
        self.w_gate = nn.Parameter(torch.empty(dim, num_experts))
        self.w_noise = nn.Parameter(torch.empty(dim, num_experts))
        # "code": FastMoE's kaiming_uniform_(a=√5) on the (D, E) tensor, whose PyTorch fan-in is E: bound
        # 1/√E = 0.71 for E = 2 [V]; "fan_in": the same on the (E, D) view, fan-in D (bound 1/√D) like nn.Linear
        for w in (self.w_gate, self.w_noise):
            nn.init.kaiming_uniform_(w if init == "code" else w.T, a=math.sqrt(5))

    def forward(self, x_TD: torch.Tensor):
        """(clean logits, noisy logits, noise std or None), all (T, E) fp32."""
        x = x_TD.float()
        clean = x @ self.w_gate.float()
        if not self.training:
            return clean, clean, None
        std = F.softplus(x @ self.w_noise.float()) + self.noise_epsilon
        return clean, clean + torch.randn_like(clean) * std, std


def prob_in_top_k(clean_TE: torch.Tensor, noisy_TE: torch.Tensor, std_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Shazeer's smooth load: P(expert e is in x's top-k) when only e's noise is resampled, (T, E).
    If e is in the top-k now, the bar is the (k+1)-th largest noisy logit; otherwise the k-th
    (``moe.losses.prob_in_top_k`` with ``threshold_mode="shazeer_in_out"``)."""
    return prob_in_top_k_core(clean_TE, noisy_TE, std_TE, k, "shazeer_in_out")


# ---------------------------------------------------------------------------------------------------
# the latency-aware load-balancing loss
def latency_aware_loss(importance_E: torch.Tensor, load_E: torch.Tensor | None, alpha: Sequence[float] | torch.Tensor
                       ) -> torch.Tensor:
    """ShiftAddViT's LL-loss, ``CV²(α ⊙ Imp) + CV²(α ⊙ Load)`` (the load term is left out when ``load_E``
    is None). With α = 1 it is the standard importance + load CV² loss; it is invariant to scaling α and
    minimal when α_e · n_e is equal across experts (token shares ∝ 1/α_e)."""
    a = torch.as_tensor(alpha, dtype=importance_E.dtype, device=importance_E.device)
    if a.shape != importance_E.shape or bool((a <= 0).any()):
        raise ConfigError(f"alpha must hold one positive cost per expert ({importance_E.shape[-1]}), got "
                          f"{a.tolist()}")
    loss = cv_squared(a * importance_E)
    if load_E is not None:
        loss = loss + cv_squared(a * load_E)
    return loss


def modelled_latency(shares: Sequence[float], alpha: Sequence[float]) -> dict[str, float]:
    """Per-token latency of a layer from its token shares n_e (summing to 1 with top-1) and per-token costs
    α_e, relative to sending every token to expert 0 (the multiplication expert):
    ``parallel = max_e α_e n_e / α_0`` (experts run side by side) and ``sequential = Σ_e α_e n_e / α_0``
    (one after the other)."""
    if len(shares) != len(alpha):
        raise ConfigError(f"shares ({len(shares)}) and alpha ({len(alpha)}) must have one entry per expert")
    cost = [a * n for a, n in zip(alpha, shares)]
    return {"parallel": max(cost) / alpha[0], "sequential": sum(cost) / alpha[0]}


# ---------------------------------------------------------------------------------------------------
# the MoE linear layer
GATE_WEIGHTS = ("topk_softmax", "straight_through")


class MoELinear(nn.Module):
    """A drop-in for ``nn.Linear``: each token goes to its top-k of ``experts`` (modules mapping Din -> Dout)
    and the outputs are combined with the gates. After each forward ``aux_loss`` holds
    ``loss_weight · L_LL`` (training) and ``tokens_per_expert`` the (E,) counts of the top-k choices."""

    def __init__(self, experts: Sequence[nn.Module], in_features: int, out_features: int, *, top_k: int = 1,
                 router: str = "noisy", alpha: Sequence[float] | None = None, loss_weight: float = 0.01,
                 gate_weight: str = "topk_softmax", router_init: str = "code"):
        super().__init__()
        E = len(experts)
        if E < 2:
            raise ConfigError(f"MoELinear needs at least 2 experts, got {E}")
        if not isinstance(top_k, int) or not 1 <= top_k <= E:
            raise ConfigError(f"top_k must be an integer in [1, {E}], got {top_k!r}")
        if router not in ("noisy", "naive"):
            raise ConfigError(f"router must be 'noisy' or 'naive', got {router!r}")
        if gate_weight not in GATE_WEIGHTS:
            raise ConfigError(f"gate_weight must be one of {GATE_WEIGHTS}, got {gate_weight!r}")
        alpha = [1.0] * E if alpha is None else [float(a) for a in alpha]
        if len(alpha) != E or min(alpha) <= 0:
            raise ConfigError(f"alpha must hold {E} positive per-token costs, got {alpha}")
        if loss_weight < 0:
            raise ConfigError(f"loss_weight must be >= 0, got {loss_weight}")
        self.experts = nn.ModuleList(experts)
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.top_k, self.alpha, self.loss_weight = E, top_k, alpha, loss_weight
        self.gate_weight = gate_weight
        if router == "naive" and top_k == 1 and gate_weight == "topk_softmax":
            import warnings

            warnings.warn("MoELinear(router='naive', top_k=1, gate_weight='topk_softmax'): the gate weight is always 1 "
                          "and the load is a hard count, so the router gets no gradient and keeps its initial "
                          "routing (as FastMoE's NaiveGate); use router='noisy' or gate_weight='straight_through' "
                          "to train it", stacklevel=2)
        self.router = NoisyGate(in_features, E, top_k, init=router_init) if router == "noisy" \
            else NaiveGate(in_features, E, top_k)
        self.aux_loss: torch.Tensor | None = None
        self.tokens_per_expert: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with last dim {self.in_features}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x_TD = x.reshape(-1, self.in_features)
        clean, noisy, std = self.router(x_TD)
        top_v, top_i = noisy.topk(self.top_k, dim=-1)  # (T, K)
        gates_TK = torch.softmax(top_v, dim=-1)
        if self.gate_weight == "straight_through":  # value of the top-k softmax, gradient of the full softmax
            p = torch.softmax(noisy, dim=-1).gather(1, top_i)
            gates_TK = gates_TK.detach() + p - p.detach()
        gates_TE = torch.zeros_like(noisy).scatter(1, top_i, gates_TK)
        y = x_TD.new_zeros(x_TD.shape[0], self.out_features)
        for e, expert in enumerate(self.experts):
            rows = (top_i == e).any(dim=1).nonzero().squeeze(1)
            if rows.numel():
                out = expert(x_TD.index_select(0, rows))
                y = y.index_add(0, rows, out * gates_TE[rows, e:e + 1].to(out.dtype))
        counts = torch.zeros(self.num_experts, device=x.device).index_add_(
            0, top_i.reshape(-1), torch.ones(top_i.numel(), device=x.device))
        self.tokens_per_expert = counts.detach()
        if self.training and self.loss_weight > 0:
            load = prob_in_top_k(clean, noisy, std, self.top_k).sum(0) if std is not None else counts
            self.aux_loss = self.loss_weight * latency_aware_loss(gates_TE.sum(0), load, self.alpha)
        else:
            self.aux_loss = None
        return y.reshape(*lead, self.out_features)


# ---------------------------------------------------------------------------------------------------
# reparameterising a ViT
class _CollectAux(nn.Module):
    """Wraps a block's MLP or attention: returns ``MoEOutput(out, Σ aux of its MoELinears, None)`` so the
    ViT block adds the LL-loss to the model's aux loss."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> MoEOutput:
        y = self.inner(x)
        aux = y.new_zeros((), dtype=torch.float32)
        for m in self.inner.modules():
            if isinstance(m, MoELinear) and m.aux_loss is not None:
                aux = aux + m.aux_loss
        return MoEOutput(out=y, aux_loss=aux, stats=None)


MODES = ("moe", "shift", "mult")


def shiftadd_reparameterize(model: nn.Module, mode: str = "moe", *, attention: bool = False,
                            blocks: Sequence[int] | None = None, alpha: Sequence[float] = (6.0, 4.0),
                            loss_weight: float = 0.01, router: str = "noisy", gate_weight: str = "topk_softmax",
                            router_init: str = "code", weight_bits: int = 5,
                            act_bits: tuple[int, int] | None = (16, 16)) -> nn.Module:
    """Replace, in place, the MLP linears (fc1, fc2) of a dense ``VisionTransformer``'s ``blocks`` (default
    all) with ``MoELinear{mult = the original Linear, shift = ShiftLinear.from_linear}`` (``mode="moe"``)
    or with ``ShiftLinear`` alone (``mode="shift"``; ``"mult"`` leaves them). ``attention=True`` also does
    the attention's qkv and proj. Returns ``model``. Expert 0 is the multiplication expert, so ``alpha`` is
    (α_mult, α_shift)."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    n_blocks = len(model.blocks)
    idx = range(n_blocks) if blocks is None else list(blocks)
    bad = [i for i in idx if not (isinstance(i, int) and 0 <= i < n_blocks)]
    if bad:
        raise ConfigError(f"blocks: {bad} out of range for a model with {n_blocks} blocks")
    if mode == "mult":
        return model
    for i in idx:
        blk = model.blocks[i]
        targets = [(blk.mlp, ("fc1", "fc2"))]
        if attention:
            targets.append((blk.attn, ("qkv", "proj")))
        for parent, names in targets:
            for name in names:
                lin = getattr(parent, name, None)
                if not isinstance(lin, nn.Linear):
                    raise ConfigError(f"block {i}: expected a dense nn.Linear at {type(parent).__name__}.{name}, "
                                      f"got {type(lin).__name__} (reparameterise a dense ViT once)")
                shift = ShiftLinear.from_linear(lin, weight_bits=weight_bits, act_bits=act_bits)
                if mode == "shift":
                    new = shift
                else:
                    new = MoELinear([lin, shift], lin.in_features, lin.out_features, router=router, alpha=alpha,
                                    loss_weight=loss_weight, gate_weight=gate_weight, router_init=router_init)
                    new.router.to(device=lin.weight.device)
                setattr(parent, name, new)
        if mode == "moe":
            blk.mlp = _CollectAux(blk.mlp)
            if attention:
                blk.attn = _CollectAux(blk.attn)
    return model


def moe_linears(model: nn.Module) -> list[tuple[str, MoELinear]]:
    """(name, layer) of every ``MoELinear`` in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoELinear)]


def shift_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``shift`` and ``sign`` parameters of every ``ShiftLinear`` (train them without weight decay:
    decay would pull signs to 0 and shifts to 2^0 = 1)."""
    out = []
    for m in model.modules():
        if isinstance(m, ShiftLinear):
            out += [m.shift, m.sign]
    return out
