"""LayerScale (Touvron et al., ICCV 2021, "Going deeper with image transformers", CaiT): a learned
per-channel scale on each residual branch, ``x + gamma * f(x)``. DINOv2 uses it (init 1e-5 in training,
1.0 in HF's config default). Key ``gamma`` as timm's ``blocks.i.ls1.gamma``."""

from __future__ import annotations

import torch
import torch.nn as nn


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        return x_BND * self.gamma

    def extra_repr(self) -> str:
        return f"dim={self.gamma.numel()}"
