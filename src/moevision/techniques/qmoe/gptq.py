"""Batched GPTQ over a stack of experts with QMoE's ternary and 2-bit grids.

GPTQ: Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (arXiv 2210.17323); batched per-expert use and grids: QMoE (Frantar & Alistarh 2023,
arXiv 2310.16795), spec ``multimodal_compression_systems.md`` §1 B2/B3 [V].

Weights here are in ``nn.Linear`` layout, W (R rows = output channels, C columns = inputs), and H is
the Hessian of the layer's reconstruction loss, proportional to X^T X over the inputs X (N, C) the
layer saw. Columns are quantised left to right; each column's rounding error is spread over the
not-yet-quantised columns through the upper Cholesky factor U of H^-1 ("lazy batch" blocks of
``blocksize`` columns). The result is invariant to scaling H by a positive constant (down to the
1e-6 floor on the dampening), also with dead inputs (zero rows/columns of H): as in the reference
``batch_gptq`` they get no special case, their diagonal is just the dampening and their weights are
quantised (not zeroed), uncoupled from the other columns.

Grids are per output row and fixed from the original row before GPTQ moves any weight (B2). Their
parameters are rounded to ``scale_dtype`` (bf16, the storage type) *before* quantising, so what GPTQ
computes is exactly what the decoder reproduces.

Shape legend: E experts, R rows (outputs), C columns (inputs), N tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import ConfigError

GRIDS = ("ternary", "2bit")


@dataclass
class QuantResult:
    """``q`` the dequantised weights (E, R, C) fp32; ``codes`` integer codes (E, R, C): ternary
    0 = zero, 1 = lo, 2 = hi; 2-bit 0..3; ``grid`` (E, R, 2): (lo, hi) for ternary, (scale, zero) for
    2-bit; ``fallback`` (E,) bool: experts quantised with H = I (round to nearest); ``loss`` (E,) the
    GPTQ proxy loss sum (w - q)^2 / (2 d^2)."""

    q: torch.Tensor
    codes: torch.Tensor
    grid: torch.Tensor
    fallback: torch.Tensor
    loss: torch.Tensor


def make_grid(w_ERC: torch.Tensor, bits: str, scale_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Per-row grid parameters (E, R, 2) from lo = min(0, min w), hi = max(0, max w) (both 0 -> -1, 1).
    Ternary: (lo, hi), rounded to ``scale_dtype``. 2-bit: (scale = (hi - lo) / 3 rounded to
    ``scale_dtype``, zero = round(-lo / scale))."""
    if bits not in GRIDS:
        raise ConfigError(f"bits must be one of {GRIDS}, got {bits!r}")
    lo = w_ERC.amin(-1).clamp(max=0)
    hi = w_ERC.amax(-1).clamp(min=0)
    both = (lo == 0) & (hi == 0)
    lo, hi = torch.where(both, -1.0, lo), torch.where(both, 1.0, hi)
    if bits == "ternary":
        return torch.stack([lo, hi], -1).to(scale_dtype).float()
    scale = ((hi - lo) / 3).to(scale_dtype).float()
    zero = torch.round(-lo / scale).clamp(0, 3)
    return torch.stack([scale, zero], -1)


def quantize_column(w_ER: torch.Tensor, grid_ER2: torch.Tensor, bits: str,
                    zero_threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise one column (values, codes). Ternary: hi above ``zero_threshold * hi``, lo below
    ``zero_threshold * lo`` (strict), else 0; QMoE's nearest rounding is 0.5, larger values give more
    zeros (a shorter code) at a larger rounding error, an option of this project."""
    a, b = grid_ER2[..., 0], grid_ER2[..., 1]
    if bits == "ternary":
        code = torch.where(w_ER > b * zero_threshold, 2, torch.where(w_ER < a * zero_threshold, 1, 0))
        val = torch.where(code == 2, b, torch.where(code == 1, a, torch.zeros_like(a)))
        return val, code
    code = torch.clamp(torch.round(w_ER / a) + b, 0, 3)
    return a * (code - b), code.long()


def dequantize(codes: torch.Tensor, grid: torch.Tensor, bits: str) -> torch.Tensor:
    """Values from integer codes and per-row grids (any leading shape; grid (..., R, 2))."""
    a, b = grid[..., 0:1].float(), grid[..., 1:2].float()
    if bits == "ternary":  # code 0 -> 0, 1 -> lo, 2 -> hi: one gather from the row's three levels
        levels = torch.cat([torch.zeros_like(a), a, b], -1).expand(*codes.shape[:-1], 3)
        return levels.gather(-1, codes.long())
    return a * (codes.float() - b)


def rtn(w_ERC: torch.Tensor, bits: str, scale_dtype: torch.dtype = torch.bfloat16, *,
        zero_threshold: float = 0.5) -> QuantResult:
    """Round to nearest on the same grid (GPTQ with H = I gives exactly this)."""
    grid = make_grid(w_ERC.float(), bits, scale_dtype)
    q, codes = quantize_column(w_ERC.float(), grid.unsqueeze(2).expand(*w_ERC.shape, 2), bits, zero_threshold)
    E = w_ERC.shape[0]
    return QuantResult(q, codes, grid, torch.ones(E, dtype=torch.bool), torch.zeros(E))


def _inverse_cholesky(H_ECC: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + damp I)^-1 per expert; experts whose factorisation fails (or whose
    H is all zero) get H = I. Returns (U, fallback mask)."""
    E, C, _ = H_ECC.shape
    H = H_ECC.clone()
    eye = torch.eye(C, dtype=H.dtype, device=H.device)
    empty = H.diagonal(dim1=-2, dim2=-1).abs().sum(-1) == 0
    H[empty] = eye
    # as the reference batch_gptq: an input that never fired keeps H_jj = 0 (and its weights), and the
    # dampening alone fills that diagonal entry, so c * H gives the same result as H (B3)
    damp = (percdamp * H.diagonal(dim1=-2, dim2=-1).mean(-1)).clamp(min=1e-6)
    H = H + damp[:, None, None] * eye
    L, info = torch.linalg.cholesky_ex(H)
    failed = info != 0
    if failed.any():
        H[failed] = eye
        L[failed] = torch.linalg.cholesky(H[failed])
    Hinv = torch.cholesky_inverse(L)
    U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
    bad = info2 != 0
    if bad.any():
        U[bad] = eye
    return U, empty | failed | bad


def gptq(w_ERC: torch.Tensor, H_ECC: torch.Tensor, bits: str = "ternary", *, percdamp: float = 0.1,
         blocksize: int = 128, actorder: bool = False, scale_dtype: torch.dtype = torch.bfloat16,
         zero_threshold: float = 0.5, compute_dtype: torch.dtype = torch.float32) -> QuantResult:
    """Batched GPTQ (B3): one call quantises E experts' (R, C) matrices with their own Hessians.

    ``percdamp``: dampening as a fraction of the mean Hessian diagonal (QMoE: 0.1). ``actorder``:
    quantise columns in order of decreasing diag(H) (undone at the end). Experts with a zero Hessian or
    a failed Cholesky fall back to H = I (round to nearest), flagged in ``fallback``.
    """
    if w_ERC.dim() != 3 or H_ECC.shape != (w_ERC.shape[0], w_ERC.shape[2], w_ERC.shape[2]):
        raise ValueError(f"gptq expects W (E, R, C) and H (E, C, C), got {tuple(w_ERC.shape)} and {tuple(H_ECC.shape)}")
    if not percdamp >= 0:
        raise ConfigError(f"percdamp must be >= 0, got {percdamp}")
    if not (isinstance(blocksize, int) and blocksize >= 1):
        raise ConfigError(f"blocksize must be a positive integer, got {blocksize!r}")
    E, R, C = w_ERC.shape
    W = w_ERC.to(compute_dtype).clone()
    H = H_ECC.to(compute_dtype)
    grid = make_grid(w_ERC.float(), bits, scale_dtype).to(compute_dtype)  # from the original rows
    perm = None
    if actorder:
        perm = torch.argsort(H.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True)  # (E, C)
        W = W.gather(2, perm.unsqueeze(1).expand(E, R, C))
        H = H.gather(1, perm.unsqueeze(2).expand(E, C, C)).gather(2, perm.unsqueeze(1).expand(E, C, C))
    U, fallback = _inverse_cholesky(H, percdamp)
    Q = torch.zeros_like(W)
    codes = torch.zeros(E, R, C, dtype=torch.long, device=W.device)
    losses = torch.zeros(E, R, C, dtype=compute_dtype, device=W.device)
    for i1 in range(0, C, blocksize):
        i2 = min(i1 + blocksize, C)
        W1 = W[:, :, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, :, i]
            d = U1[:, i, i].unsqueeze(1)  # (E, 1)
            q, code = quantize_column(w, grid, bits, zero_threshold)
            Q[:, :, i1 + i], codes[:, :, i1 + i] = q, code
            losses[:, :, i1 + i] = (w - q) ** 2 / (2 * d ** 2)
            err = (w - q) / d
            W1[:, :, i:] -= err.unsqueeze(2) * U1[:, i, i:].unsqueeze(1)
            Err1[:, :, i] = err
        W[:, :, i2:] -= torch.bmm(Err1, U[:, i1:i2, i2:])
    if perm is not None:
        inv = torch.argsort(perm, dim=-1).unsqueeze(1).expand(E, R, C)
        Q, codes, losses = Q.gather(2, inv), codes.gather(2, inv), losses.gather(2, inv)
    return QuantResult(Q.float(), codes, grid.float(), fallback.cpu(), losses.sum((1, 2)).float().cpu())


def hessian(x_NC: torch.Tensor) -> torch.Tensor:
    """H = 2 X^T X / N (fp32; zeros for N = 0)."""
    x = x_NC.float()
    return 2.0 * x.T @ x / max(x.shape[0], 1)
