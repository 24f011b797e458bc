"""Edge-MoE's software-reusable numerics (Sarkar et al., ICCAD 2023; vision_moe.md §10(b) items 7-10).

Edge-MoE is the FPGA accelerator for M³ViT. These are its algorithmic pieces, as plain PyTorch, for
hardware-parity experiments (what accuracy a model keeps with the accelerator's arithmetic):

- ``online_softmax``: the single-pass softmax. A running (max m, sum s) per row is updated score by score
  (a > m: s <- s·exp(m - a) + 1, m <- a; else s <- s + exp(a - m)); the probabilities exp(a_j - m)/s are
  produced afterwards, in the consumer. Exact in exact arithmetic, one pass over the scores.
- ``gelu_lut``: GELU(x) = ReLU(x) - δ(|x|), δ(u) = u·Φ(-u), δ from a 177-entry table on [0, 5.5] (step 1/32,
  last entry 0) with linear interpolation; ReLU beyond 5.5.
- ``streaming_topk``: top-k kept as a sorted list of k (score, index) pairs, each new score inserted in
  turn (ties keep the earlier index first).
- ``dispatch_by_expert``: patch reordering: a queue of (token, gate) per expert and a meta-queue of
  non-empty experts; each expert's weights are used once, on its whole queue, and gate x output is
  accumulated into the token rows. The same function as token-wise MoE.

The functions are exact re-statements of the spec for testing and parity measurements. ``edge_numerics``
wires them into a copy of a trained model for a hardware-parity evaluation (``moevision eval
--edge-numerics``): GELU by the table in every MLP and expert, attention by the single-pass softmax, and
optionally ap_fixed<W, I> emulation of the weights (Edge-MoE: <16, 2>) and of the features (<32, 10>: every
linear / convolution / LayerNorm output). The fast paths in ``moevision.kernels`` are untouched.
Deviations of the emulation: attention scores and softmax statistics stay in floating point; quantisation
follows ap_fixed's default modes (AP_TRN: round toward -inf; AP_WRAP: two's-complement wrap-around) unless
``rounding`` / ``overflow`` choose round-to-nearest / saturation.

Shape legend: R rows, E experts (or scores per row), K top-k, T tokens, D width.
"""

from __future__ import annotations

import math

import torch

from ..moe.experts import Experts
from ..moe.types import RoutingPlan

LUT_STEP = 1.0 / 32.0
LUT_MAX = 5.5
LUT_SIZE = 177  # k = 0..176, u = k/32 in [0, 5.5]


def online_softmax_stats(scores: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over ``dim``: the running max m and 1/s (s = sum exp(a - m)), each with ``dim`` removed.
    -inf scores contribute nothing (a row of only -inf gives m = -inf, 1/s = inf, as softmax gives NaN)."""
    x = scores.movedim(dim, -1)
    m = torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype, device=x.device)
    s = torch.zeros_like(m)
    for j in range(x.shape[-1]):
        a = x[..., j]
        finite = a != float("-inf")
        bigger = finite & (a > m)
        # a > m: rescale the sum to the new max and count a as exp(0) = 1; else add exp(a - m)
        rescaled = torch.where(bigger, s * torch.exp(torch.where(bigger, m - a, torch.zeros_like(a))) + 1.0, s)
        add = torch.where(finite & ~bigger, torch.exp(torch.where(finite & ~bigger, a - m, torch.zeros_like(a))),
                          torch.zeros_like(a))
        s = rescaled + add
        m = torch.where(bigger, a, m)
    return m, 1.0 / s


def online_softmax(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """softmax(scores, dim) from the single-pass statistics (``online_softmax_stats``)."""
    m, inv_s = online_softmax_stats(scores, dim)
    x = scores.movedim(dim, -1)
    return (torch.exp(x - m.unsqueeze(-1)) * inv_s.unsqueeze(-1)).movedim(-1, dim)


def _delta(u: torch.Tensor) -> torch.Tensor:
    """δ(u) = u·Φ(-u), Φ the standard normal CDF."""
    return u * 0.5 * torch.erfc(u / math.sqrt(2.0))


def gelu_lut_table(dtype=torch.float64, device=None) -> torch.Tensor:
    """The 177 entries δ(k/32), k = 0..176, the last set to 0 (Edge-MoE)."""
    t = _delta(torch.arange(LUT_SIZE, dtype=dtype, device=device) * LUT_STEP)
    t[-1] = 0.0
    return t


def gelu_lut(x: torch.Tensor) -> torch.Tensor:
    """GELU by Edge-MoE's residual lookup table: ReLU(x) - δ(|x|), δ linearly interpolated in the table
    (|x| < 5.5) and 0 beyond. Max error against exact GELU ~1e-4 on [-8, 8]; differentiable piecewise."""
    table = gelu_lut_table(x.dtype if x.is_floating_point() else torch.float32, x.device)
    u = torch.nan_to_num(x.abs(), nan=0.0)  # NaN is put back at the end
    pos = (u * (1.0 / LUT_STEP)).clamp(max=LUT_SIZE - 1)
    i = pos.floor().long().clamp(max=LUT_SIZE - 2)
    t = pos - i.to(pos.dtype)
    d = table[i] + t * (table[i + 1] - table[i])
    d = torch.where(u >= LUT_MAX, torch.zeros_like(d), d)
    return torch.where(torch.isnan(x), x, torch.relu(x) - d)


def streaming_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the last axis by insertion into a sorted list of k (score, index) pairs, one score at a
    time (Edge-MoE's streaming top-k). Returns (values, indices) like ``torch.topk``, largest first; equal
    scores keep the earlier index first. Every row needs at least k scores."""
    R = scores.shape[:-1]
    E = scores.shape[-1]
    if not 1 <= k <= E:
        raise ValueError(f"k must be in [1, {E}], got {k}")
    vals = torch.full((*R, k), float("-inf"), dtype=scores.dtype, device=scores.device)
    idx = torch.full((*R, k), -1, dtype=torch.long, device=scores.device)
    slots = torch.arange(k, device=scores.device)
    for j in range(E):
        a = scores[..., j:j + 1]  # (..., 1)
        # insert after every kept entry >= a (ties: earlier index first); a list slot of -1 is empty
        pos = ((vals >= a) & (idx >= 0)).sum(-1, keepdim=True)  # (..., 1) in [0, k]
        shifted_v = torch.cat([vals[..., :1], vals[..., :-1]], -1)
        shifted_i = torch.cat([idx[..., :1], idx[..., :-1]], -1)
        vals = torch.where(slots < pos, vals, torch.where(slots == pos, a, shifted_v))
        idx = torch.where(slots < pos, idx, torch.where(slots == pos, torch.full_like(idx, j), shifted_i))
    return vals, idx


def dispatch_by_expert(x_TD: torch.Tensor, plan: RoutingPlan, experts: Experts) -> torch.Tensor:
    """Expert-major MoE (Edge-MoE's patch reordering): per expert a queue of its kept (token, gate) pairs;
    the meta-queue lists the experts with a non-empty queue; each expert runs once on its whole queue
    and gate x output is accumulated into the token rows. Same function as the token-wise MoE."""
    kept = plan.kept
    tok, exp, gate = plan.token_idx[kept], plan.expert_idx[kept], plan.gates[kept]
    order = torch.argsort(exp, stable=True)  # the queues, one after another, in token order inside each
    tok, exp, gate = tok[order], exp[order], gate[order]
    counts = torch.bincount(exp, minlength=experts.num_experts).tolist()
    meta_queue = [e for e, n in enumerate(counts) if n]
    out = torch.zeros_like(x_TD)
    start = 0
    bounds = {}
    for e, n in enumerate(counts):
        bounds[e] = (start, start + n)
        start += n
    for e in meta_queue:  # load expert e's weights once, run its whole queue
        a, b = bounds[e]
        y = experts.forward_expert(e, x_TD[tok[a:b]])
        out = out.index_add(0, tok[a:b], y * gate[a:b].unsqueeze(-1).to(y.dtype))
    return out


# ---------------------------------------------------------------------------------------------------
# hardware-parity evaluation: the numerics wired into a copy of a model
ROUNDING = ("trn", "rnd")  # AP_TRN (toward -inf, ap_fixed's default) | AP_RND-like round to nearest
OVERFLOW = ("wrap", "sat")  # AP_WRAP (ap_fixed's default) | AP_SAT


def quantize_fixed(x: torch.Tensor, total_bits: int, int_bits: int, *, rounding: str = "trn",
                   overflow: str = "wrap") -> torch.Tensor:
    """``x`` as ap_fixed<total_bits, int_bits> (signed, int_bits integer bits including the sign): a
    multiple of 2^-(total_bits - int_bits) in [-2^(int_bits-1), 2^(int_bits-1)), computed in x's dtype
    (exact in float64 for total_bits <= 52)."""
    if not (isinstance(total_bits, int) and isinstance(int_bits, int) and 1 <= int_bits <= total_bits <= 52):
        raise ValueError(f"ap_fixed<{total_bits}, {int_bits}>: need 1 <= int_bits <= total_bits <= 52")
    if rounding not in ROUNDING or overflow not in OVERFLOW:
        raise ValueError(f"rounding must be one of {ROUNDING} and overflow one of {OVERFLOW}, "
                         f"got {rounding!r}, {overflow!r}")
    scale = 2.0 ** (total_bits - int_bits)
    q = torch.floor(x * scale) if rounding == "trn" else torch.round(x * scale)
    lo, span = -(2.0 ** (total_bits - 1)), 2.0 ** total_bits
    if overflow == "sat":
        q = q.clamp(lo, -lo - 1)
    else:
        q = torch.remainder(q - lo, span) + lo
    return q / scale


class GELULUT(torch.nn.Module):
    """``gelu_lut`` as a module (a drop-in for ``nn.GELU``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_lut(x)


def _edge_attention_forward(self, x_BND: torch.Tensor) -> torch.Tensor:
    """``layers.Attention.forward`` with the scores normalised by the single-pass softmax."""
    B, N, D = x_BND.shape
    q, k, v = self.qkv(x_BND).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    p = online_softmax((q @ k.transpose(-1, -2)) * self.head_dim ** -0.5)
    return self.proj_drop(self.proj((p @ v).transpose(1, 2).reshape(B, N, D)))


def edge_numerics(model: torch.nn.Module, *, gelu: bool = True, softmax: bool = True,
                  weights: tuple[int, int] | None = None, features: tuple[int, int] | None = None,
                  rounding: str = "trn", overflow: str = "wrap") -> torch.nn.Module:
    """A copy of ``model`` computing with Edge-MoE's numerics (for evaluation; the original is untouched):
    ``gelu``: every ``nn.GELU`` of an MLP and every GELU expert activation by ``gelu_lut`` (MoE layers then
    run the ``sorted`` path, whose experts call their activation function); ``softmax``: every plain
    ``layers.Attention`` by ``online_softmax``; ``weights`` / ``features`` = (W, I): ap_fixed<W, I> weights
    (every parameter of a linear, convolution, expert or router) and features (the output of every linear,
    convolution and LayerNorm). Other attention variants (MoH, MoA) keep their softmax."""
    import copy
    import types

    from ..layers import Attention
    from ..moe import MoE

    def q(t, fmt):
        return quantize_fixed(t, *fmt, rounding=rounding, overflow=overflow)

    for fmt, name in ((weights, "weights"), (features, "features")):
        if fmt is not None:
            if len(fmt) != 2:
                raise ValueError(f"{name} must be (total_bits, int_bits), got {fmt!r}")
            q(torch.zeros(1), fmt)  # validates the format (a clear error before copying the model)
    new = copy.deepcopy(model)
    for name, m in list(new.named_modules()):
        if gelu:
            for child_name, child in list(m.named_children()):
                if type(child) is torch.nn.GELU and child.approximate == "none":
                    setattr(m, child_name, GELULUT())
            if isinstance(m, MoE) and m.experts.activation == "gelu":
                m.experts.act = gelu_lut
                m.impl = "sorted"
        if softmax and type(m) is Attention:
            m.forward = types.MethodType(_edge_attention_forward, m)
        if features is not None and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm)):
            m.register_forward_hook(lambda mod, inp, out: q(out, features))
    if weights is not None:
        with torch.no_grad():
            for name, p in new.named_parameters():
                owner = new.get_submodule(name.rsplit(".", 1)[0]) if "." in name else new
                if isinstance(owner, (torch.nn.Linear, torch.nn.Conv2d)) or ".experts." in f".{name}" \
                        or ".router." in f".{name}":
                    p.copy_(q(p, weights))
    return new
