"""Experts with stacked weights, expert axis first (the checkpoint keys ``experts.w1/w2/w3/b1/b2``).

GELU MLP with biases (ViT, V-MoE):  y = (act(x @ w1 + b1)) @ w2 + b2
SwiGLU without biases (Mixtral):    y = (silu(x @ w1) * (x @ w3)) @ w2

Shape legend: E experts, D width, F hidden, N tokens of one expert, C slots per expert.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # exact (erf) GELU, as ViT
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
EXPERT_ACTIVATIONS = tuple(ACTIVATIONS) + ("swiglu",)


class Experts(nn.Module):
    """E independent MLPs stored as stacked tensors.

    ``init="independent"`` (default) draws each expert like an ``nn.Linear`` (U(±1/sqrt(fan_in)));
    ``init="shared"`` gives every expert expert 0's weights, as V-MoE does ("all experts share
    initialization"; the router breaks the symmetry).
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, *, activation: str = "gelu",
                 bias: bool = True, init: str = "independent"):
        super().__init__()
        if activation not in EXPERT_ACTIVATIONS:
            raise ConfigError(f"activation must be one of {EXPERT_ACTIVATIONS}, got {activation!r}")
        if activation == "swiglu" and bias:
            raise ConfigError("activation='swiglu' experts have no biases; pass bias=False")
        if init not in ("independent", "shared"):
            raise ConfigError(f"expert init must be 'independent' or 'shared', got {init!r}")
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.activation, self.has_bias, self.init = activation, bias, init
        self.swiglu = activation == "swiglu"
        self.act = F.silu if self.swiglu else ACTIVATIONS[activation]
        E, D, Fh = num_experts, dim, hidden_dim
        self.w1 = nn.Parameter(torch.empty(E, D, Fh))
        self.w2 = nn.Parameter(torch.empty(E, Fh, D))
        if self.swiglu:
            self.w3 = nn.Parameter(torch.empty(E, D, Fh))
        if bias:
            self.b1 = nn.Parameter(torch.empty(E, Fh))
            self.b2 = nn.Parameter(torch.empty(E, D))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for name, fan_in in (("w1", self.dim), ("w3", self.dim), ("w2", self.hidden_dim),
                                 ("b1", self.dim), ("b2", self.hidden_dim)):
                p = getattr(self, name, None)
                if p is not None:
                    bound = 1.0 / math.sqrt(fan_in)
                    p.uniform_(-bound, bound)
                    if self.init == "shared":
                        p.copy_(p[:1].expand_as(p))

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
                f"activation={self.activation}, bias={self.has_bias}")

    # -- one expert (reference) -------------------------------------------------------------------
    def forward_expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        h = x_ND @ self.w1[e]
        if self.has_bias:
            h = h + self.b1[e]
        h = self.act(h) * (x_ND @ self.w3[e]) if self.swiglu else self.act(h)
        y = h @ self.w2[e]
        return y + self.b2[e] if self.has_bias else y

    # -- padded buffers: (E, C, D) -> (E, C, D), batched matmul ------------------------------------
    def forward_padded(self, x_ECD: torch.Tensor) -> torch.Tensor:
        h = torch.bmm(x_ECD, self.w1)
        if self.has_bias:
            h = h + self.b1.unsqueeze(1)
        h = self.act(h) * torch.bmm(x_ECD, self.w3) if self.swiglu else self.act(h)
        y = torch.bmm(h, self.w2)
        return y + self.b2.unsqueeze(1) if self.has_bias else y

    # -- tokens sorted by expert, one grouped GEMM per projection (torch._grouped_mm) -------------
    def grouped_mm_ok(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
        """Whether ``torch._grouped_mm`` can run these shapes in ``dtype`` (default: x's and the
        weights' common dtype): CPU fp32/bf16 (bf16 only under ``torch.compile``), CUDA bf16 on a
        Hopper-class GPU (sm90+); rows 16-byte aligned."""
        if not hasattr(torch, "_grouped_mm"):
            return False
        if dtype is None:
            if self.w1.dtype != x.dtype:
                return False
            dtype = x.dtype
        # CPU runs fp32 too in eager mode, but the op's meta function (torch.compile) accepts bf16 only
        compiling = torch.compiler.is_compiling()
        ok_dtypes = (torch.bfloat16,) if x.is_cuda or compiling else (torch.float32, torch.bfloat16)
        if dtype not in ok_dtypes:
            return False
        align = 16 // torch.empty((), dtype=dtype).element_size()
        if self.dim % align or self.hidden_dim % align:
            return False
        if x.is_cuda:
            # torch.compile constant-folds this query (dynamo's trace rules list it as in-graph)
            return torch.cuda.get_device_capability(x.device) >= (9, 0)
        return True

    def forward_grouped(self, x_ND: torch.Tensor, offs: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert; ``offs`` (E,) int32 = cumulative counts; ``expert_of_row`` (N,)."""
        h = torch._grouped_mm(x_ND, self.w1, offs=offs)
        if self.has_bias:
            h = h + self.b1.index_select(0, expert_of_row)
        h = self.act(h) * torch._grouped_mm(x_ND, self.w3, offs=offs) if self.swiglu else self.act(h)
        y = torch._grouped_mm(h, self.w2, offs=offs)
        return y + self.b2.index_select(0, expert_of_row) if self.has_bias else y

    # -- tokens sorted by expert with a count per expert ------------------------------------------
    def forward_sorted(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Tokens grouped by expert (expert 0's first), ``counts[e]`` of them for expert e.

        The stacked weights are unbound once (one UnbindBackward stacks the gradients) rather than
        indexed per expert (each SelectBackward would allocate a full (E, ...) gradient)."""
        w1, w2 = self.w1.unbind(0), self.w2.unbind(0)
        w3 = self.w3.unbind(0) if self.swiglu else None
        b1, b2 = (self.b1.unbind(0), self.b2.unbind(0)) if self.has_bias else (None, None)
        outs = []
        for e, chunk in enumerate(torch.split(x_ND, counts)):
            if not chunk.shape[0]:
                continue
            h = torch.addmm(b1[e], chunk, w1[e]) if b1 is not None else chunk @ w1[e]
            h = self.act(h) * (chunk @ w3[e]) if w3 is not None else self.act(h)
            outs.append(torch.addmm(b2[e], h, w2[e]) if b2 is not None else h @ w2[e])
        return torch.cat(outs) if outs else x_ND.new_zeros(0, self.dim)
