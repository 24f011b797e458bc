"""Image corruptions for robustness evaluation, written in torch on [0, 1] batches (B, C, H, W).

Gaussian noise, impulse (salt-and-pepper) noise, Gaussian blur and contrast reduction, in the spirit of
ImageNet-C (Hendrycks & Dietterich 2019), at severities suited to small grey images. Deterministic for
a given generator seed.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def gaussian_noise(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    return (x + sigma * torch.randn(x.shape, generator=generator)).clamp(0, 1)


def impulse_noise(x: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(x.shape, generator=generator)
    x = x.clone()
    x[u < amount / 2] = 0.0
    x[(u >= amount / 2) & (u < amount)] = 1.0
    return x


def gaussian_blur(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    radius = max(1, int(round(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    xp = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    xp = F.conv2d(xp, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(xp, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def contrast(x: torch.Tensor, factor: float, generator: torch.Generator | None = None) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * factor + mean).clamp(0, 1)


CORRUPTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "gaussian_noise": gaussian_noise, "impulse_noise": impulse_noise, "gaussian_blur": gaussian_blur,
    "contrast": contrast,
}


def make_corruption(name: str, severity: float, seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {sorted(CORRUPTIONS)}")
    gen = torch.Generator().manual_seed(seed)
    fn = CORRUPTIONS[name]
    return lambda x: fn(x, severity, gen)
