"""MomentumSMoE (Teo & Nguyen, NeurIPS 2024, "MomentumSMoE: Integrating Momentum into Sparse Mixture of
Experts", arXiv 2410.14574): momentum across the MoE layers of a network, depth as time.

Each MoE block's residual becomes an optimiser step on the MoE output f = MoE(LN2(x)):
- heavy ball (``variant="heavy_ball"``): m_t = mu m_{t-1} + gamma f(x_t);  x_{t+1} = x_t + m_t.
  mu = 0, gamma = 1 is the plain residual (canonical sign convention; the reference code flips the
  sign of f, which the experts' output layer absorbs).
- robust (``variant="robust"``, Cyrus et al. 2018, as in rachtsy/vmoe): kappa > 1,
  rho in [1 - 1/sqrt(kappa), 1 - 1/kappa]; alpha = kappa (1-rho)^2 (1+rho) / L,
  beta = kappa rho^3 / (kappa - 1), gamma_r = rho^3 / ((kappa-1)(1-rho)^2(1+rho)); look-ahead input
  y = LN2(x) + gamma_r alpha p_{t-1}; p_t = MoE(y) + beta p_{t-1}; x_{t+1} = x_t + alpha p_t.
- Adam (``variant="adam"``, the reference language code): at the MoE layers listed in ``adam_layers``
  (default the first, index 0 among MoE layers) a = b1 a + (1-b1) f, v = b2 v + (1-b2) f^2 from zero,
  x_{t+1} = x_t + gamma1 a / sqrt(v + 1e-8) (no bias correction) and the heavy-ball buffer is set to
  gamma2 f; later MoE layers use heavy ball with (mu, gamma2).
``learnable=True`` (the paper's ablation, [R]; default False = fixed floats): in every MoE block mu and
gamma become scalar ``nn.Parameter``s initialised to the configured values (one pair per block, in the
state dict as ``blocks.i.mu`` / ``blocks.i.gamma``, trained by the optimiser without weight decay);
heavy-ball and adam only (robust uses the (kappa, rho) constants). Dense blocks get no parameters; in an
adam layer mu is unused (its grad stays None).
Dense blocks pass the buffers through unchanged. ``post_residual_norm=True`` adds the vision reference
code's extra LayerNorm after every block's MLP residual (off by default; a departure of that code).
The buffers live in the per-forward ``state`` dict the ViT threads through its blocks.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..models.vit import Block, call_attn, call_mlp, register_block
from ..moe import MoE
from ..moe.types import MoEOutput


def robust_constants(kappa: float, rho: float, L: float = 1.0) -> tuple[float, float, float]:
    """(alpha, beta, gamma_r) of the robust momentum method; kappa=1.25, rho=0.2 -> (0.96, 0.04, 0.041667)."""
    if kappa <= 1:
        raise ConfigError(f"robust momentum needs kappa > 1, got {kappa}")
    lo, hi = 1 - 1 / math.sqrt(kappa), 1 - 1 / kappa
    if not lo - 1e-12 <= rho <= hi + 1e-12:
        warnings.warn(f"robust momentum: rho={rho} outside [1 - 1/sqrt(kappa), 1 - 1/kappa] = [{lo:.4f}, {hi:.4f}]",
                      stacklevel=2)
    alpha = kappa * (1 - rho) ** 2 * (1 + rho) / L
    beta = kappa * rho**3 / (kappa - 1)
    gamma_r = rho**3 / ((kappa - 1) * (1 - rho) ** 2 * (1 + rho))
    return alpha, beta, gamma_r


class MomentumBlock(Block):
    def __init__(self, dim: int, num_heads: int, mlp: nn.Module, *, variant: str = "heavy_ball",
                 mu: float = 0.7, gamma: float = 1.0, kappa: float = 1.25, rho: float = 0.2,
                 beta1: float = 0.9, beta2: float = 0.999, gamma1: float = 1.0, adam_layers: list | None = None,
                 post_residual_norm: bool = False, learnable: bool = False, **kw):
        super().__init__(dim, num_heads, mlp, **kw)
        if variant not in ("heavy_ball", "robust", "adam"):
            raise ConfigError(f"momentum variant must be heavy_ball, robust or adam, got {variant!r}")
        if learnable and variant == "robust":
            raise ConfigError("momentum learnable=True makes mu and gamma parameters; the robust variant does "
                              "not use them (it uses kappa, rho)")
        self.variant, self.learnable = variant, bool(learnable)
        if self.learnable and isinstance(mlp, MoE):  # scalar parameters, one pair per MoE block
            self.mu = nn.Parameter(torch.tensor(float(mu)))
            self.gamma = nn.Parameter(torch.tensor(float(gamma)))
        else:
            self.mu, self.gamma = mu, gamma
        self.beta1, self.beta2, self.gamma1 = beta1, beta2, gamma1
        self.adam_layers = set(adam_layers if adam_layers is not None else [0])
        if variant == "robust":
            self.alpha, self.beta, self.gamma_r = robust_constants(kappa, rho)
        self.norm3 = nn.LayerNorm(dim) if post_residual_norm else nn.Identity()

    def forward(self, x: torch.Tensor, state: dict | None = None):
        state = {} if state is None else state
        aux = None
        a = call_attn(self.attn, self.norm1(x), state)
        if isinstance(a, MoEOutput):
            a, aux = a.out, a.aux_loss
        x = x + self.drop_path(a)
        if not isinstance(self.mlp, MoE):  # dense blocks: plain residual, buffers pass through
            return self.norm3(x + self.drop_path(self.mlp(self.norm2(x)))), aux, None
        t = state.get("moe_index", 0)
        state["moe_index"] = t + 1
        u = self.norm2(x)
        if self.variant == "robust":
            p_prev = state.get("p")
            y = u if p_prev is None else u + self.gamma_r * self.alpha * p_prev
            o = call_mlp(self.mlp, y, state)
            p = o.out if p_prev is None else o.out + self.beta * p_prev
            state["p"] = p
            step = self.alpha * p
        elif self.variant == "adam" and t in self.adam_layers:
            o = call_mlp(self.mlp, u, state)
            f = o.out
            m1 = (1 - self.beta1) * f + self.beta1 * state.get("adam_a", 0.0)
            v = (1 - self.beta2) * f * f + self.beta2 * state.get("adam_v", 0.0)
            state["adam_a"], state["adam_v"] = m1, v
            state["m"] = self.gamma * f
            step = self.gamma1 * m1 / torch.sqrt(v + 1e-8)
        else:  # heavy ball (also adam's later layers)
            o = call_mlp(self.mlp, u, state)
            m = self.gamma * o.out + (self.mu * state["m"] if "m" in state else 0.0)
            state["m"] = m
            step = m
        aux = o.aux_loss if aux is None else aux + o.aux_loss
        return self.norm3(x + self.drop_path(step)), aux, o.stats


register_block("momentum", MomentumBlock)
