"""DeepSpeed's top-2 gating (``second_expert_noise="gumbel"``, MoE-LLaVA): the first expert is the argmax, the
others are sampled by the Gumbel-max trick, so the second choice of a token with probabilities p and
first choice f is expert e with probability p_e / (1 - p_f) (the oracle below, independent of the code's
noise draw). Gates stay the clean probabilities; eval is deterministic unless asked."""

import pytest
import torch

from moevision import MoE
from moevision.errors import ConfigError
from moevision.models.vlm import VLMConfig
from moevision.moe.router import TopKRouter


def _router(K=2, E=4, **kw):
    torch.manual_seed(0)
    r = TopKRouter(8, E, K, noise_std=0.0, capacity_factor=None, second_expert_noise="gumbel", **kw)
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0], [0.5, 0, 0, 0, 0, 0, 0, 0],
                                     [0, 0.3, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]])[:E])
    return r


def test_second_choice_follows_the_softmax_over_the_remaining_experts():
    r = _router().train()
    S = 40000
    x = torch.zeros(1, S, 8)
    x[..., 0], x[..., 1] = 2.0, 1.0  # one token, repeated: logits (2, 1, 0.3, 0)
    torch.manual_seed(1)
    plan = r(x)
    top = plan.expert_idx.view(S, 2)
    probs = torch.softmax(torch.tensor([2.0, 1.0, 0.3, 0.0]), 0)
    assert (top[:, 0] == 0).all()  # the argmax, never sampled
    assert (top[:, 1] != 0).all()
    freq = torch.bincount(top[:, 1], minlength=4).double() / S
    want = probs.double() / (1 - probs[0])
    want[0] = 0
    assert torch.allclose(freq, want, atol=0.01), (freq, want)  # ~5 sigma at S=40000
    # gates: the clean probabilities of the chosen experts (no renormalisation by default)
    gates = plan.gates.view(S, 2)
    assert torch.allclose(gates[:, 0], probs[0].expand(S))
    d = (gates[:, 1] - probs[top[:, 1]]).abs()
    assert d.max() < 1e-5, (d.max(), d.argmax(), gates[d.argmax()], top[d.argmax()], probs)


def test_eval_is_deterministic_top_k_unless_asked():
    x = torch.randn(1, 64, 8)
    r = _router(K=3).eval()
    plain = TopKRouter(8, 4, 3, noise_std=0.0, capacity_factor=None).eval()
    plain.load_state_dict(r.state_dict())
    a, b = r(x), plain(x)
    assert torch.equal(a.expert_idx, b.expert_idx) and torch.equal(a.gates, b.gates)
    r.second_expert_noise_in_eval = True  # older DeepSpeed: sampled in eval too
    torch.manual_seed(0)
    outs = {tuple(r(x).expert_idx.tolist()) for _ in range(5)}
    assert len(outs) > 1
    first = r(x).expert_idx.view(64, 3)[:, 0]
    assert torch.equal(first, b.expert_idx.view(64, 3)[:, 0])  # the first choice never moves
    rows = r(x).expert_idx.view(64, 3)
    assert all(len(set(row.tolist())) == 3 for row in rows)  # K distinct experts a token


def test_layer_with_gumbel_trains_and_respects_an_expert_mask():
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, 2, second_expert_noise="gumbel", noise_std=0.0, impl="loop").train()
    x = torch.randn(3, 10, 8, requires_grad=True)
    out = moe(x)
    (out.out.sum() + out.aux_loss).backward()
    assert x.grad is not None and moe.router.weight.grad is not None
    mask = torch.zeros(1, 30, 4, dtype=torch.bool)
    mask[..., 2:] = True  # only experts 2 and 3 allowed
    plan = moe.router(x.detach().reshape(1, 30, 8), expert_mask_GSE=mask)
    assert set(plan.expert_idx.tolist()) <= {2, 3}


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="second_expert_noise"):
        TopKRouter(8, 4, 2, second_expert_noise="gauss")
    with pytest.raises(ConfigError, match="top_k >= 2"):
        MoE(8, 16, 4, 1, second_expert_noise="gumbel")
    with pytest.raises(ConfigError, match="router='topk'"):
        MoE(8, 16, 4, 2, router="expert_choice", second_expert_noise="gumbel")
    with pytest.raises(Exception, match="second_expert_noise"):
        VLMConfig.from_dict({"second_expert_noise": "uniform"})


def test_vit_config_builds_gumbel_layers_and_checks_the_setting():
    from moevision.models.vit import ViTConfig

    base = dict(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2, num_classes=3,
                moe_layers="all", num_experts=4, top_k=2)
    cfg = ViTConfig.from_dict({**base, "second_expert_noise": "gumbel"})
    assert cfg.moe_kwargs()["second_expert_noise"] == "gumbel"
    with pytest.raises(Exception, match="second_expert_noise"):
        ViTConfig.from_dict({**base, "top_k": 1, "second_expert_noise": "gumbel"})
