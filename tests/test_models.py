"""Model zoo: every registered model builds, runs, round-trips through save/from_pretrained."""

import json

import pytest
import torch

import moevision as mv
from moevision.moe import MoE


@pytest.mark.parametrize("name", [n for n in mv.list_models() if "vlm" not in n])  # VLMs: test_vlm.py
def test_every_registered_model_forward_backward(name):
    m = mv.create_model(name)
    c = m.config
    x = torch.randn(2, c.in_chans, c.img_size, c.img_size)
    out = m(x)
    assert out.logits.shape == (2, c.num_classes)
    assert len(out.routing) == len(m.moe_layers) == len(out.moe_layers)
    feats = m.forward_features(x)
    assert feats.shape == (2, m.patch_embed.num_patches + m.num_prefix_tokens, c.embed_dim)
    m.eval()
    torch.testing.assert_close(m.forward_head(m.forward_features(x)), m(x).logits)
    m.train()
    (out.logits.sum() + out.aux_loss).backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if "router" not in n or m.moe_layers)


def test_moe_layers_are_data_and_active_params():
    m = mv.create_model("moe_vit_tiny_test", depth=4, moe_layers=[0, 3], num_experts=3, top_k=2)
    assert [i for i, b in enumerate(m.blocks) if isinstance(b.mlp, MoE)] == [0, 3]
    dense = mv.create_model("vit_tiny_test", depth=4)
    # active = dense params + routers + (k-1) extra experts' worth of MLP per MoE block
    mlp = sum(p.numel() for p in dense.blocks[0].mlp.parameters())
    router = 3 * 32
    assert m.num_active_params() == dense.num_params() + 2 * (router + mlp)
    assert m.num_params() == dense.num_params() + 2 * (router + 2 * mlp)


def test_state_dict_keys_follow_timm_and_moe_contract():
    keys = set(mv.create_model("moe_vit_tiny_test").state_dict())
    for k in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.attn.qkv.weight",
              "blocks.0.mlp.fc1.weight", "blocks.1.mlp.router.weight", "blocks.1.mlp.experts.w1",
              "blocks.1.mlp.experts.b2", "norm.weight", "head.weight"):
        assert k in keys


def test_one_expert_moe_vit_equals_dense_vit():
    dense = mv.create_model("vit_tiny_test").eval()
    moe = mv.create_model("vit_tiny_test", moe_layers="all", num_experts=1, top_k=1).eval()
    sd = {}
    for k, v in dense.state_dict().items():
        blk = k.split(".")
        if ".mlp.fc1.weight" in k:
            sd[k.replace("fc1.weight", "experts.w1")] = v.t().unsqueeze(0)
        elif ".mlp.fc1.bias" in k:
            sd[k.replace("fc1.bias", "experts.b1")] = v.unsqueeze(0)
        elif ".mlp.fc2.weight" in k:
            sd[k.replace("fc2.weight", "experts.w2")] = v.t().unsqueeze(0)
        elif ".mlp.fc2.bias" in k:
            sd[k.replace("fc2.bias", "experts.b2")] = v.unsqueeze(0)
        else:
            sd[k] = v
    for i in range(len(moe.blocks)):
        sd[f"blocks.{i}.mlp.router.weight"] = moe.state_dict()[f"blocks.{i}.mlp.router.weight"]
    moe.load_state_dict(sd)
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(moe(x).logits, dense(x).logits, rtol=1e-5, atol=1e-5)


def test_save_and_from_pretrained_round_trip(tmp_path):
    m = mv.create_model("moe_vit_tiny_test", router="expert_choice").eval()
    m.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / "model.safetensors").is_file()
    m2 = mv.from_pretrained(tmp_path / "m").eval()
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(m(x).logits, m2(x).logits)
    assert m2.config == m.config


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(mv.CheckpointError, match="config.json"):
        mv.from_pretrained(tmp_path)
    m = mv.create_model("moe_vit_tiny_test")
    d = m.save_pretrained(tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(mv.CheckpointError, match="corrupt"):
        mv.from_pretrained(d)
    m.save_pretrained(d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(mv.CheckpointError, match="corrupt|truncated"):
        mv.from_pretrained(d)
    # a config asking for more experts than the weights hold: never load silently
    m.save_pretrained(d)
    meta = json.loads((d / "config.json").read_text())
    meta["config"]["num_experts"] = 8
    (d / "config.json").write_text(json.dumps(meta))
    with pytest.raises(mv.CheckpointError, match="shape"):
        mv.from_pretrained(d)


def test_create_model_errors():
    with pytest.raises(mv.ConfigError, match="unknown model"):
        mv.create_model("resnet9000")
    with pytest.raises(mv.ConfigError, match="num_experts"):
        mv.create_model("moe_vit_tiny_test", num_experts=0)
    with pytest.raises(mv.ConfigError, match="top_k"):
        mv.create_model("moe_vit_tiny_test", num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="expected images"):
        mv.create_model("vit_tiny_test")(torch.randn(2, 3, 16, 16))
