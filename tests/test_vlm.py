"""The small VLM (models/vlm.py): tokenizer, MoE-LLaVA stage parameter sets, upcycling, MoMa groups,
answer-only loss, greedy decoding, overfitting and save/load."""

import pytest
import torch
import torch.nn.functional as F

import moevision as mv
from moevision.models.tokenizer import SPECIALS, WordTokenizer
from moevision.models.vlm import IGNORE, set_stage, stage_parameters, upcycle
from moevision.train.vlm import Samples, collate


pytestmark = pytest.mark.usefixtures("one_thread")


def test_tokenizer_round_trip_and_unknown_words():
    tok = WordTokenizer.build(["what color is the shape?", "is there a red circle ?", "A . red B . blue"])
    assert tok.vocab[:4] == list(SPECIALS)
    assert tok.vocab == WordTokenizer.build(["is there a red circle ?", "A . red B . blue",
                                             "what color is the shape?"]).vocab  # order-independent
    ids = tok.encode("what color is the shape?")
    assert tok.decode(ids) == "what color is the shape ?"
    assert tok.decode(ids + [tok.eos_id] + tok.encode("red")) == "what color is the shape ?"
    assert tok.encode("a green circle") == [tok.index["a"], tok.unk_id, tok.index["circle"]]
    assert tok.unknown_words("a green circle") == ["green"]
    assert "A" in tok.index and "a" in tok.index  # case kept: option letters differ from the article
    with pytest.raises(ValueError):
        WordTokenizer(["a", "b"])


def _batch(model, qa, rows=None):
    tok = model.tokenizer
    s = Samples(torch.zeros(1), rows or list(range(len(qa))), [], [])
    for q, a in qa:
        p = tok.encode(q) + [tok.sep_id]
        s.ids.append(p + tok.encode(a) + [tok.eos_id])
        s.start.append(len(p))
    return collate(s, list(range(len(qa))), tok.pad_id)


QA = [("what is the shape ?", "circle"), ("is there a circle ?", "yes"), ("what color is the shape ?", "red"),
      ("is there a shape ?", "no")]


def test_stage_parameter_sets_match_the_moe_llava_table():
    m = mv.create_model("moe_vlm_tiny_test", depth=4)  # MoE in layers 0 and 2 ("sparse")
    names = {n for n, _ in m.named_parameters()}
    proj = {n for n in names if n.startswith("projector.")}
    vision = {n for n in names if n.startswith("vision.")}
    lm = names - proj - vision
    assert proj and vision and {"embed.weight", "lm_head.weight", "norm.weight"} <= lm
    assert stage_parameters(m, 1) == proj
    assert stage_parameters(m, 2) == proj | lm
    moe = {n for n in names if n.startswith(("layers.0.ffn.", "layers.2.ffn."))}
    assert moe == {f"layers.{i}.ffn.{k}" for i in (0, 2) for k in ("router.weight", "experts.w1", "experts.w2", "experts.w3")}
    assert stage_parameters(m, 3, stage3_trainable="moe_only") == moe
    all_ffn = moe | {f"layers.{i}.ffn.{k}.weight" for i in (1, 3) for k in ("gate_proj", "up_proj", "down_proj")}
    assert stage_parameters(m, 3) == all_ffn  # the code's substring match also trains the dense FFNs
    for st in (1, 2, 3):
        assert not stage_parameters(m, st) & vision  # the vision tower is never trained
    # set_stage: exactly these parameters get gradients and move
    set_stage(m, 3, stage3_trainable="moe_only")
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    tokens, lengths, labels, _ = _batch(m, QA)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m(tokens, lengths, labels, images=torch.rand(4, 3, 32, 32)).loss.backward()
    opt.step()
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed == moe


def test_upcycled_model_equals_the_dense_model_at_step_zero():
    dense = mv.create_model("vlm_tiny_test", depth=4).double().eval()
    moe = upcycle(dense, moe_layers="sparse").double().eval()
    assert moe.moe_layers == (0, 2) and dense.moe_layers == ()
    ex = moe.layers[0].ffn.experts
    assert torch.equal(ex.w1[0], ex.w1[3]) and torch.equal(ex.w1[1], dense.layers[0].ffn.gate_proj.weight.t())
    tokens, lengths, labels, _ = _batch(dense, QA)
    img = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    a, b = dense(tokens, lengths, labels, images=img), moe(tokens, lengths, labels, images=img)
    assert all(float(st.dropped_fraction) == 0 for st in b.routing)
    valid = torch.arange(tokens.shape[1]) < lengths.unsqueeze(1)  # padding positions carry no output
    Ni = dense.config.num_image_tokens
    torch.testing.assert_close(b.logits[:, Ni:][valid], a.logits[:, Ni:][valid], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(b.logits[:, :Ni], a.logits[:, :Ni], rtol=1e-10, atol=1e-10)
    # total loss = LM loss + 0.01 * sum of the Switch losses (each = E * sum f P, >= 1)
    sw = sum(st.aux_losses["switch"] for st in b.routing)
    torch.testing.assert_close(b.loss, b.lm_loss + 0.01 * sw)
    assert float(sw) >= 2.0 - 1e-9


def test_loss_is_on_answer_tokens_only():
    m = mv.create_model("vlm_tiny_test").double()
    tokens, lengths, labels, _ = _batch(m, QA[:2])
    out = m(tokens, lengths, labels)  # text only: no image tokens in front
    logp = out.logits.log_softmax(-1)
    terms = []
    for b, (q, a) in enumerate(QA[:2]):
        start = len(m.tokenizer.encode(q)) + 1
        target = m.tokenizer.encode(a) + [m.tokenizer.eos_id]
        terms += [-logp[b, start + j - 1, t] for j, t in enumerate(target)]
    torch.testing.assert_close(out.lm_loss, torch.stack(terms).mean().float())
    assert int((labels != IGNORE).sum()) == len(terms)


def test_moma_image_tokens_never_reach_text_experts():
    torch.manual_seed(0)
    img = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    for image_experts, isolated in ((2, True), (0, False)):
        m = mv.create_model("moe_vlm_tiny_test", image_experts=image_experts).double().eval()
        tokens, lengths, labels, _ = _batch(m, QA)
        out = m(tokens, lengths, labels, images=img)
        Ni = m.config.num_image_tokens
        load = out.modality_load[0]  # (2, E): image row, text row
        if isolated:
            assert load[0, 2:].sum() == 0 and load[1, :2].sum() == 0 and load[0].sum() == 4 * Ni * 2
        with torch.no_grad():  # oracle: change the text experts only
            for k in ("w1", "w2", "w3"):
                getattr(m.layers[0].ffn.experts, k)[2:].mul_(3.0).add_(0.1)
        out2 = m(tokens, lengths, labels, images=img)
        same = torch.equal(out2.logits[:, :Ni], out.logits[:, :Ni])
        assert same == isolated
        assert not torch.equal(out2.logits[:, Ni:], out.logits[:, Ni:])


def test_batched_greedy_decoding_equals_one_by_one():
    m = mv.create_model("moe_vlm_tiny_test").eval()
    img = torch.rand(4, 3, 32, 32)
    qs = [q for q, _ in QA]
    batched = m.answer(qs, images=img, max_new_tokens=4)
    for i, q in enumerate(qs):
        assert m.answer([q], images=img[i:i + 1], max_new_tokens=4) == [batched[i]]


def test_tiny_vlm_overfits_a_few_examples():
    torch.manual_seed(0)
    m = mv.create_model("moe_vlm_tiny_test")
    qa = QA * 2
    img = torch.rand(len(qa), 3, 32, 32)
    tokens, lengths, labels, _ = _batch(m, qa)
    set_stage(m, 2)
    m.vision.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=5e-3)
    for _ in range(100):
        loss = m(tokens, lengths, labels, images=img).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m.answer([q for q, _ in qa], images=img) == [a for _, a in qa]


def test_save_load_round_trip_keeps_weights_and_vocabulary(tmp_path):
    m = mv.create_model("moe_vlm_tiny_test", image_experts=2, vocab=list(SPECIALS) + ["is", "red", "?"]).eval()
    m.save_pretrained(tmp_path / "m")
    r = mv.from_pretrained(tmp_path / "m").eval()
    assert r.tokenizer.vocab == m.tokenizer.vocab and r.config == m.config
    tokens, lengths, labels, _ = _batch(m, [("is red ?", "red")])
    img = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(r(tokens, lengths, images=img).logits, m(tokens, lengths, images=img).logits,
                               rtol=0, atol=0)


def test_config_errors_name_the_field():
    with pytest.raises(mv.ConfigError, match="model.image_experts"):
        mv.create_model("moe_vlm_tiny_test", image_experts=3)  # leaves 1 < top_k text expert
    with pytest.raises(mv.ConfigError, match="model.image_pool"):
        mv.create_model("vlm_tiny_test", image_pool=3)
