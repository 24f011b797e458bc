"""Batched GPTQ with QMoE's grids (spec §1 B2/B3): grid arithmetic by hand, batched == per-expert,
identity Hessian == round to nearest, scale invariance, fallbacks, and lower output error than RTN on
correlated inputs (measured as ||X W^T - X Q^T||)."""

import importlib

import pytest
import torch

G = importlib.import_module("moevision.techniques.qmoe.gptq")  # the module (the package exports the function)


def test_ternary_grid_and_thresholds_by_hand():
    w = torch.tensor([[[-0.5, -0.25, -0.2, 0.0, 0.5, 0.51, 1.0]], [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]])
    grid = G.make_grid(w, "ternary")
    assert grid[0, 0].tolist() == [-0.5, 1.0]  # lo = min(0, min w), hi = max(0, max w)
    assert grid[1, 0].tolist() == [-1.0, 1.0]  # an all-zero row gets the {-1, 0, 1} grid
    r = G.rtn(w, "ternary")
    # hi above hi/2 = 0.5 (strictly), lo below lo/2 = -0.25 (strictly), 0 otherwise
    assert r.q[0, 0].tolist() == [-0.5, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert r.codes[0, 0].tolist() == [1, 0, 0, 0, 0, 2, 2]
    assert set(r.q[0].unique().tolist()) <= {-0.5, 0.0, 1.0}
    assert r.q[1].abs().sum() == 0
    # a larger zero threshold zeroes more
    assert G.rtn(w, "ternary", zero_threshold=0.6).codes[0, 0].tolist() == [1, 0, 0, 0, 0, 0, 2]


def test_two_bit_grid_by_hand():
    w = torch.tensor([[[-0.25, 0.0, 0.1, 0.3, 0.5]]])
    # lo = -0.25, hi = 0.5: scale 0.25, zero round(1.0) = 1; levels -0.25, 0, 0.25, 0.5
    grid = G.make_grid(w, "2bit")
    assert grid[0, 0].tolist() == [0.25, 1.0]
    r = G.rtn(w, "2bit")
    assert r.q[0, 0].tolist() == [-0.25, 0.0, 0.0, 0.25, 0.5]
    assert r.codes[0, 0].tolist() == [0, 1, 1, 2, 3]
    assert torch.equal(G.dequantize(r.codes, r.grid, "2bit"), r.q)


def _correlated(E=3, N=1500, C=48, R=24, rank=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(E, N, rank, generator=g) @ torch.randn(E, rank, C, generator=g) + 0.1 * torch.randn(E, N, C, generator=g)
    W = 0.05 * torch.randn(E, R, C, generator=g)
    H = torch.stack([G.hessian(x) for x in X])
    return X, W, H


@pytest.mark.parametrize("bits", ["ternary", "2bit"])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(bits):
    X, W, H = _correlated()
    for actorder in (False, True):
        q = G.gptq(W, H, bits, blocksize=16, actorder=actorder)
        r = G.rtn(W, bits)
        for e in range(W.shape[0]):
            err_g = torch.linalg.norm(X[e] @ (W[e] - q.q[e]).T)
            err_r = torch.linalg.norm(X[e] @ (W[e] - r.q[e]).T)
            assert err_g < 0.9 * err_r, (bits, actorder, e, float(err_g), float(err_r))
        # values stay on the per-row grid fixed before GPTQ moved any weight
        assert torch.equal(G.dequantize(q.codes, q.grid, bits), q.q)
        assert torch.equal(q.grid, r.grid)


@pytest.mark.parametrize("bits", ["ternary", "2bit"])
def test_batched_equals_per_expert_identity_equals_rtn_and_scale_invariance(bits):
    _, W, H = _correlated(seed=1)
    batched = G.gptq(W, H, bits, blocksize=8)
    for e in range(W.shape[0]):
        one = G.gptq(W[e:e + 1], H[e:e + 1], bits, blocksize=8)
        assert torch.allclose(one.q[0], batched.q[e], atol=1e-6)
    # the block size only changes when updates are applied, not the result
    assert torch.allclose(G.gptq(W, H, bits, blocksize=48).q, batched.q, atol=1e-6)
    eye = torch.eye(W.shape[2]).expand_as(H).contiguous()
    assert torch.equal(G.gptq(W, eye, bits).q, G.rtn(W, bits).q)
    assert torch.allclose(G.gptq(W, 7.5 * H, bits, blocksize=8).q, batched.q, atol=1e-6)


def test_fallbacks_zero_tokens_and_failed_cholesky_give_rtn():
    _, W, H = _correlated(seed=2)
    H = H.clone()
    H[0] = 0.0  # an expert that received no tokens
    H[1] = -torch.eye(W.shape[2])  # not positive definite: Cholesky fails
    q = G.gptq(W, H, "ternary")
    r = G.rtn(W, "ternary")
    assert q.fallback.tolist() == [True, True, False]
    assert torch.equal(q.q[:2], r.q[:2])
    assert not torch.equal(q.q[2], r.q[2])


def test_bad_arguments():
    with pytest.raises(ValueError, match="expects W"):
        G.gptq(torch.zeros(2, 3, 4), torch.zeros(2, 3, 3))
    with pytest.raises(Exception, match="bits"):
        G.make_grid(torch.zeros(1, 1, 2), "3bit")


def _textbook_gptq(W, H, bits, percdamp=0.1):
    """Unblocked single-expert GPTQ in fp64 with the reference batch_gptq's dampening (no special case for
    dead columns): H += max(percdamp * mean diag H, 1e-6) I; U = chol(H^-1, upper); column by column."""
    W, H = W.double().clone(), H.double().clone()
    C = W.shape[1]
    grid = G.make_grid(W[None].float(), bits, torch.float32)[0].double()
    H += max(percdamp * H.diag().mean().item(), 1e-6) * torch.eye(C, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(W.shape, dtype=torch.long)
    for i in range(C):
        q, c = G.quantize_column(W[None, :, i], grid[None], bits)
        codes[:, i] = c[0]
        W[:, i:] -= ((W[:, i] - q[0]) / U[i, i])[:, None] * U[i, i:][None]
    return codes


@pytest.mark.parametrize("bits", ["ternary", "2bit"])
def test_dead_column_keeps_scale_invariance_and_matches_reference_damping(bits):
    """An input that never fired (zero row/column of H): GPTQ(c H) == GPTQ(H) exactly (spec §1(d) test 2),
    and the codes equal the textbook algorithm with the reference's damping (dead diagonal = damp only)."""
    _, W, H = _correlated(seed=3, C=20, R=12)
    W, H = W.double(), H.double().clone()
    H[:, 3, :] = 0.0
    H[:, :, 3] = 0.0
    kw = dict(scale_dtype=torch.float32, compute_dtype=torch.float64)
    base = G.gptq(W, H, bits, **kw)
    assert not base.fallback.any()
    for c in (1e-4, 64.0):
        assert torch.equal(G.gptq(W, c * H, bits, **kw).codes, base.codes), c
    ref = torch.stack([_textbook_gptq(W[e], H[e], bits) for e in range(W.shape[0])])
    assert torch.equal(base.codes, ref)
    # the dead column is quantised, not zeroed, and uncoupled: its codes are round to nearest
    assert torch.equal(base.codes[:, :, 3], G.rtn(W.float(), bits, torch.float32).codes[:, :, 3])
