"""Vectorised batch augmentations on float (B, C, H, W) tensors, driven by an explicit torch.Generator."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F

AUGMENTS: tuple[str, ...] = ("none", "flip", "flip_crop", "flip_crop_erase")


def _rand(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` uniforms in [0, 1) drawn from ``generator`` (on its device), moved to ``device``."""
    return torch.rand(n, generator=generator, device=generator.device).to(device)


def random_crop(
    x: torch.Tensor, padding: int, generator: torch.Generator, *, padding_mode: str = "zeros"
) -> torch.Tensor:
    """Pad every side by ``padding`` ("zeros" or "reflect"), then crop each sample back at a random offset."""
    if padding < 0:
        raise ValueError(f"random_crop: padding={padding} must be >= 0")
    if padding_mode not in ("zeros", "reflect"):
        raise ValueError(f"random_crop: padding_mode={padding_mode!r} must be 'zeros' or 'reflect'")
    b, _, h, w = x.shape
    span = 2 * padding + 1
    offsets = torch.randint(0, span, (2, b), generator=generator, device=generator.device).to(x.device)
    if padding == 0:
        return x.clone()
    mode = "constant" if padding_mode == "zeros" else "reflect"
    padded = F.pad(x, (padding, padding, padding, padding), mode=mode)
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)  # (B, W)
    bidx = torch.arange(b, device=x.device)[:, None, None]
    out = padded[bidx, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C): advanced dims come first
    return out.permute(0, 3, 1, 2).contiguous()


def random_hflip(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Flip each sample left-right with probability ``p``."""
    flip = _rand(x.shape[0], generator, x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_erasing(
    x: torch.Tensor,
    p: float,
    generator: torch.Generator,
    *,
    scale: tuple[float, float] = (0.02, 0.2),
    ratio: tuple[float, float] = (0.3, 3.3),
    value: float = 0.0,
) -> torch.Tensor:
    """With probability ``p`` per sample, set one random rectangle (area fraction in ``scale``) to ``value``."""
    b, _, h, w = x.shape
    u = _rand(5 * b, generator, x.device).view(5, b)
    area = (scale[0] + (scale[1] - scale[0]) * u[0]) * (h * w)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1]
    aspect = torch.exp(log_r)
    eh = torch.sqrt(area * aspect).round().clamp(1, h)
    ew = torch.sqrt(area / aspect).round().clamp(1, w)
    top = ((h - eh + 1) * u[2]).floor()
    left = ((w - ew + 1) * u[3]).floor()
    apply = u[4] < p
    r = torch.arange(h, device=x.device, dtype=x.dtype)[None, :, None]
    c = torch.arange(w, device=x.device, dtype=x.dtype)[None, None, :]
    box = (r >= top[:, None, None]) & (r < (top + eh)[:, None, None])
    box = box & (c >= left[:, None, None]) & (c < (left + ew)[:, None, None]) & apply[:, None, None]
    return x.masked_fill(box[:, None], value)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


class Augment:
    """A composition of batch augmentations: ``augment(x, generator) -> x``."""

    def __init__(self, name: str, steps: Sequence[Callable[..., torch.Tensor]] = ()) -> None:
        self.name = name
        self.steps = tuple(steps)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for step in self.steps:
            x = step(x, generator=generator)
        return x

    def __repr__(self) -> str:
        return f"Augment({self.name!r}, {len(self.steps)} steps)"


def build_augment(name: str, *, padding: int = 2, flip_p: float = 0.5, erase_p: float = 0.25) -> Augment:
    """The named augmentation pipeline: "none", "flip_crop" or "flip_crop_erase"."""
    crop = partial(random_crop, padding=padding)
    flip = partial(random_hflip, p=flip_p)
    if name == "none":
        return Augment(name)
    if name == "flip":
        return Augment(name, (flip,))
    if name == "flip_crop":
        return Augment(name, (crop, flip))
    if name == "flip_crop_erase":
        return Augment(name, (crop, flip, partial(random_erasing, p=erase_p)))
    raise ValueError(f"unknown augmentation {name!r}; choose one of {list(AUGMENTS)}")
