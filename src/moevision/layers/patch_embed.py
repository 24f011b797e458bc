"""Image -> token sequence: a ViT patch embedding, or a small convolutional stem (hybrid ViT).

Shape legend: B batch, C channels, H, W image size, N = tokens, D width.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class PatchEmbed(nn.Module):
    """Non-overlapping patches, one linear projection (a conv with kernel = stride = patch)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} must be divisible by patch_size={patch_size}")
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.proj(x_BCHW).flatten(2).transpose(1, 2)  # (B, N, D)


class ConvStem(nn.Module):
    """3x3 conv + BatchNorm + GELU stages, each stride 2 until the grid is ceil(img_size / patch_size),
    then a 1x1 projection to the width (Xiao et al. 2021, "Early convolutions help transformers see
    better"). Cheap on small grey images and much more sample-efficient than a linear patchify."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, channels: int = 32,
                 convs_per_stage: int = 1):
        super().__init__()
        if convs_per_stage < 1:
            raise ValueError(f"convs_per_stage must be >= 1, got {convs_per_stage}")
        if patch_size < 1 or patch_size & (patch_size - 1):
            raise ValueError(f"conv stem needs a power-of-two patch_size, got {patch_size}")
        layers: list[nn.Module] = []
        c_in, c, stride_left, grid = in_chans, channels, patch_size, img_size
        def conv(ci: int, co: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(ci, co, 3, stride, 1, bias=False), nn.BatchNorm2d(co), nn.GELU()]

        layers += conv(c_in, c, 1)
        for _ in range(convs_per_stage - 1):
            layers += conv(c, c, 1)
        c_in = c
        while stride_left > 1:
            c_out = c_in * 2
            layers += conv(c_in, c_out, 2)
            for _ in range(convs_per_stage - 1):
                layers += conv(c_out, c_out, 1)
            c_in, stride_left, grid = c_out, stride_left // 2, (grid + 1) // 2
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c_in, embed_dim, 1)
        self.grid_size = grid  # ceil(img_size / patch_size): 28 px with patch 8 gives a 4x4 grid
        self.num_patches = self.grid_size**2

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stem(x_BCHW)).flatten(2).transpose(1, 2)
