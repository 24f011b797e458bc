"""Tutel's 2DH all-to-all (spec §2(b)4) on simulated ranks: the four steps give the flat all-to-all's
result for several node x local layouts, and applying it twice is the identity (its own inverse)."""

import pytest
import torch

from moevision.distributed.all_to_all import simulate_2dh, simulate_all_to_all


def _ranks(W, c, tail=(3,)):
    # chunk d of rank s holds the value 1000 * s + d everywhere, so every misplacement shows
    return [torch.cat([torch.full((c, *tail), 1000.0 * s + d) for d in range(W)]) for s in range(W)]


@pytest.mark.parametrize("nodes,local", [(2, 2), (2, 4), (3, 2), (1, 3), (3, 1), (4, 2)])
def test_2dh_equals_the_flat_all_to_all(nodes, local):
    W = nodes * local
    xs = _ranks(W, c=2)
    flat, two = simulate_all_to_all(xs), simulate_2dh(xs, nodes, local)
    for d in range(W):
        assert torch.equal(two[d], flat[d])
        # rank d holds chunk d of every source, in source order
        assert two[d][::2, 0].tolist() == [1000.0 * s + d for s in range(W)]
    g = torch.Generator().manual_seed(W)
    rnd = [torch.randn(W * 3, 2, 5, generator=g) for _ in range(W)]
    back = simulate_2dh(simulate_2dh(rnd, nodes, local), nodes, local)
    assert all(torch.equal(a, b) for a, b in zip(back, rnd))


def test_2dh_rejects_a_wrong_layout():
    with pytest.raises(ValueError, match="ranks given"):
        simulate_2dh(_ranks(4, 1), 3, 2)
