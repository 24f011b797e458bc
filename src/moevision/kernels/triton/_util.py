"""Helpers shared by the Triton kernel wrappers."""

from __future__ import annotations

import torch

_NARROW_IDS = (torch.uint8, torch.int16, torch.int32)


def narrow_ids(t: torch.Tensor) -> torch.Tensor:
    """Expert ids or row positions for a kernel's index loads (the kernels widen them to int32 as they load):
    uint8 / int16 / int32 tensors as they are, so the expert-sort keys (``moe.dispatch.sort_by_expert``) need
    no conversion kernel; int64 narrowed to int32 (one copy)."""
    return (t if t.dtype in _NARROW_IDS else t.to(torch.int32)).contiguous()
