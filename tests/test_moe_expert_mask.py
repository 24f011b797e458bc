"""MoMa-style modality groups through ``MoE.forward(x, expert_mask=...)`` (spec §5(d) test 1)."""

import pytest
import torch

from moevision import MoE
from moevision.errors import ConfigError


def _layer(**kw):
    kw = {"router": "topk", "normalize_topk": True, "activation": "swiglu", "bias": False, "noise_std": 0.0, **kw}
    return MoE(16, 32, 4, 2, **kw).double()


def _groups(x):
    """Tokens of even position are 'image' (experts 0, 1), odd ones 'text' (experts 2, 3)."""
    is_img = (torch.arange(x.shape[1]) % 2 == 0).expand(x.shape[0], -1)
    mask = torch.zeros(*x.shape[:2], 4, dtype=torch.bool)
    mask[..., :2] = is_img.unsqueeze(-1)
    mask[..., 2:] = ~is_img.unsqueeze(-1)
    return is_img, mask


@pytest.mark.parametrize("impl", ["sorted", "padded", "loop"])
@pytest.mark.parametrize("cf", [None, 1.5])
def test_image_tokens_never_reach_text_experts(impl, cf):
    torch.manual_seed(0)
    layer = _layer(impl=impl, capacity_factor=cf, record_routing=True)
    x = torch.randn(3, 10, 16, dtype=torch.float64)
    is_img, mask = _groups(x)
    out = layer(x, expert_mask=mask)
    ids = out.stats.expert_idx  # (3, 10, K)
    assert bool((ids[is_img] < 2).all()) and bool((ids[~is_img] >= 2).all())
    # oracle: image-token outputs do not depend on the text experts' weights at all
    loss = out.out[is_img].square().sum()
    loss.backward()
    for name in ("w1", "w2", "w3"):
        g = getattr(layer.experts, name).grad
        assert g[2:].abs().max() == 0 and g[:2].abs().max() > 0
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            getattr(layer.experts, name)[2:].normal_()
    out2 = layer(x, expert_mask=mask)
    torch.testing.assert_close(out2.out[is_img], out.out[is_img], rtol=0, atol=0)
    assert not torch.allclose(out2.out[~is_img], out.out[~is_img])


def test_gates_renormalise_within_the_group_and_full_mask_is_a_no_op():
    torch.manual_seed(1)
    layer = _layer(record_routing=True)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    full = torch.ones(2, 6, 4, dtype=torch.bool)
    torch.testing.assert_close(layer(x, expert_mask=full).out, layer(x).out)
    _, mask = _groups(x)
    st = layer(x, expert_mask=mask).stats
    torch.testing.assert_close(st.gates.sum(-1), torch.ones(2, 6, dtype=torch.float64))
    # group of exactly K=2 experts: each token uses both experts of its group
    assert sorted(st.expert_idx[0, 0].tolist()) == [0, 1] and sorted(st.expert_idx[0, 1].tolist()) == [2, 3]


def test_bad_masks_are_rejected():
    layer = _layer()
    x = torch.randn(1, 4, 16, dtype=torch.float64)
    one = torch.zeros(1, 4, 4, dtype=torch.bool)
    one[..., 0] = True
    with pytest.raises(ValueError, match="fewer than top_k"):
        layer(x, expert_mask=one)
    with pytest.raises(ValueError, match="shape"):
        layer(x, expert_mask=torch.ones(4, 4, dtype=torch.bool))
    ec = MoE(16, 32, 4, router="expert_choice")
    with pytest.raises(ConfigError, match="topk"):
        ec(torch.randn(4, 16), expert_mask=torch.ones(4, 4, dtype=torch.bool))
