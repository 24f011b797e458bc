"""CompressedExperts against the oracle (ordinary Experts holding the dequantised weights), run-time
decoding of only the experts in use, the LRU cache, the compressed checkpoint format, and QMoE's
calibration flow (tokens per expert, zero-token fallback, GPTQ below RTN on the layer's output)."""

import copy
import json

import pytest
import torch

import moevision
from moevision.errors import CheckpointError, ConfigError
from moevision.moe import MoE
from moevision.techniques.qmoe import (CompressedExperts, QMoEConfig, compress_model, compression_stats,
                                       gather_expert_inputs, load_compressed, quantize_layer, quantize_model,
                                       rtn, save_compressed)

IMPLS = ["sorted", "padded", "loop", "einsum", "grouped"]


def _compressed_layer(bits, activation="gelu", bias=True, layout="stream", E=4, D=16, F=24):
    moe = MoE(D, F, E, top_k=2, activation=activation, bias=bias, capacity_factor=None, impl="sorted").eval()
    ex = moe.experts
    codes, grids = {}, {}
    for p in ("w1", "w2", "w3"):
        if hasattr(ex, p):
            r = rtn(getattr(ex, p).detach().transpose(1, 2), bits)
            codes[p], grids[p] = r.codes, r.grid
    comp = CompressedExperts.from_codes(ex, codes, grids, bits, layout=layout)
    return moe, comp


@pytest.mark.parametrize("bits,activation,bias,layout", [
    ("ternary", "gelu", True, "stream"), ("ternary", "swiglu", False, "row"), ("2bit", "gelu", True, "stream")])
def test_compressed_experts_equal_experts_with_dequantised_weights(bits, activation, bias, layout):
    moe, comp = _compressed_layer(bits, activation, bias, layout)
    oracle = copy.deepcopy(moe)
    oracle.experts = comp.dequantized_experts()
    # the oracle's weights really are on the grid: at most 3 (ternary) / 4 (2-bit) values per row
    levels = oracle.experts.w1.detach().transpose(1, 2).reshape(-1, moe.dim)
    assert max(len(row.unique()) for row in levels) <= (3 if bits == "ternary" else 4)
    x = torch.randn(3, 10, moe.dim)
    for impl in IMPLS:
        moe.impl = oracle.impl = impl
        moe.experts = comp
        y = moe(x).out
        assert torch.allclose(y, oracle(x).out, atol=1e-6), impl
    # single expert path
    x_ND = torch.randn(5, moe.dim)
    assert torch.allclose(comp.forward_expert(2, x_ND), oracle.experts.forward_expert(2, x_ND), atol=1e-6)


def test_decodes_only_used_experts_and_lru_cache():
    _, comp = _compressed_layer("ternary")
    x = torch.randn(6, comp.dim)
    comp.forward_sorted(x, [4, 0, 2, 0])
    assert comp.decode_calls == 2 and len(comp._cache) == 0  # no cache by default
    comp.cache_size = 2
    comp.forward_sorted(x, [3, 3, 0, 0])
    comp.forward_sorted(x, [3, 3, 0, 0])
    assert comp.decode_calls == 4  # the second call was served from the cache
    comp.forward_sorted(x, [0, 0, 6, 0])
    assert comp.decode_calls == 5 and list(comp._cache) == [1, 2]  # expert 0 was least recently used
    assert comp.w1.shape == (4, comp.dim, comp.hidden_dim)  # stacked decoded view for code reading weights
    assert not hasattr(comp, "w3")


def _tiny_model():
    torch.manual_seed(0)
    return moevision.create_model("moe_vit_tiny_test", capacity_factor=None).eval()


def _batches(n=4, bs=32):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(bs, 1, 16, 16, generator=g) for _ in range(n)]


def test_gather_matches_routing_statistics_and_zero_token_fallback():
    model = _tiny_model()
    moe = model.blocks[1].mlp
    batches = _batches(2)
    xs, T = gather_expert_inputs(model, moe, batches)
    counts = torch.zeros(4)
    for b in batches:
        counts += model(b).routing[0].tokens_per_expert
    assert [x.shape[0] for x in xs] == counts.int().tolist() and T == 2 * 32 * 17
    xs[3] = xs[3][:0]  # force an expert with no tokens
    res, info = quantize_layer(moe, xs, QMoEConfig())
    assert info["fallback_experts"] == [3]
    plain = rtn(moe.experts.w1.detach().transpose(1, 2), "ternary")
    assert torch.equal(res["w1"].q[3], plain.q[3]) and not torch.equal(res["w1"].q[0], plain.q[0])
    pooled, info = quantize_layer(moe, xs, QMoEConfig(fallback="pooled"))
    assert not torch.equal(pooled["w1"].q[3], plain.q[3])


@torch.no_grad()
def test_gptq_layer_output_error_below_rtn_on_calibration_tokens():
    model = _tiny_model()
    moe = model.blocks[1].mlp
    xs, _ = gather_expert_inputs(model, moe, _batches(2))
    ref = [moe.experts.forward_expert(e, x) for e, x in enumerate(xs)]
    errs = {}
    for method in ("gptq", "rtn"):
        res, _ = quantize_layer(moe, xs, QMoEConfig(method=method))
        ex = copy.deepcopy(moe.experts)
        with torch.no_grad():
            for p, r in res.items():
                getattr(ex, p).copy_(r.q.transpose(1, 2))
        errs[method] = sum(float((ex.forward_expert(e, x) - ref[e]).pow(2).sum()) for e, x in enumerate(xs))
    assert errs["gptq"] < 0.9 * errs["rtn"], errs


@pytest.mark.parametrize("bits", ["ternary", "2bit"])
def test_compressed_checkpoint_round_trip(tmp_path, bits):
    model = _tiny_model()
    work = copy.deepcopy(model)
    cfg = QMoEConfig(bits=bits, dictionary="fit", layout="row")
    res = quantize_model(work, lambda: _batches(2), cfg)
    comp = compress_model(work, res, cfg)
    x = _batches(1, 8)[0]
    # compressed == the model holding dequantised weights (to rounding: the dense model's experts take the
    # fused grouped-GEMM path, the compressed ones decode per expert)
    torch.testing.assert_close(comp(x).logits, work(x).logits, rtol=1e-5, atol=1e-6)
    stats = compression_stats(comp)
    assert stats["expert_params"] == 4 * (32 * 64 * 2 + 64 + 32)
    save_compressed(comp, tmp_path / "c", cfg)
    meta = json.loads((tmp_path / "c" / "config.json").read_text())
    assert meta["format"] == "qmoe" and meta["compression"]["options"]["bits"] == bits
    loaded = moevision.from_pretrained(tmp_path / "c").eval()
    assert isinstance(loaded.blocks[1].mlp.experts, CompressedExperts)
    assert torch.equal(loaded(x).logits, comp(x).logits)
    assert compression_stats(loaded)["expert_bytes"] == stats["expert_bytes"]
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "c" / "model.safetensors"))
    key = "blocks.1.mlp.experts.w1_codes" if bits == "ternary" else "blocks.1.mlp.experts.w1_packed"
    assert state[key].dtype == (torch.int16 if bits == "ternary" else torch.uint8)
    del state[key]
    save_file(state, str(tmp_path / "c" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        load_compressed(tmp_path / "c")


def test_compressing_twice_or_a_dense_model_is_an_error():
    with pytest.raises(ConfigError, match="no MoE layers"):
        quantize_model(moevision.create_model("vit_tiny_test"), lambda: _batches(1), QMoEConfig())
    model = _tiny_model()
    cfg = QMoEConfig(method="rtn")
    comp = compress_model(model, quantize_model(copy.deepcopy(model), None, cfg), cfg)
    with pytest.raises(ConfigError, match="already compressed"):
        quantize_model(comp, None, cfg)
    with pytest.raises(ConfigError, match="zero_threshold"):
        QMoEConfig(zero_threshold=1.5).validate()


def test_rate_control_picks_the_smallest_zero_threshold_meeting_the_target():
    from moevision.techniques.qmoe.pipeline import CompressOptions, compress

    model = _tiny_model()
    calib = _batches(1)
    free, _ = compress(model, calib, CompressOptions(method="rtn"))
    spec_bits = compression_stats(free)["bits_per_expert_param"]
    target = spec_bits - 0.4
    _, info = compress(model, calib, CompressOptions(method="rtn", target_bits=target))
    assert info["target_met"] and info["bits_per_expert_param"] <= target and info["zero_threshold"] > 0.5
    below = round(info["zero_threshold"] - 0.05, 2)
    _, prev = compress(model, calib, CompressOptions(method="rtn", qmoe=QMoEConfig(zero_threshold=below)))
    assert prev["bits_per_expert_param"] > target
    with pytest.raises(ConfigError, match="target_bits"):
        CompressOptions(target_bits=1.0, qmoe=QMoEConfig(bits="2bit")).validate()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", ["ternary", "2bit"])
def test_cuda_decode_and_forward_match_the_cpu(bits):
    moe, comp = _compressed_layer(bits, E=8, D=64, F=96)
    oracle = copy.deepcopy(moe)
    oracle.experts = comp.dequantized_experts()  # decoded on the CPU
    moe.experts = comp
    x = torch.randn(4, 33, moe.dim)
    want = oracle(x).out
    moe, oracle = moe.cuda(), oracle.cuda()
    w_gpu = comp.decoded(list(range(8)), torch.float32)
    assert all(torch.equal(w_gpu[p].transpose(1, 2).cpu(), getattr(oracle.experts, p).detach().cpu()) for p in w_gpu)
    for impl in ("sorted", "padded"):
        moe.impl = oracle.impl = impl
        assert torch.allclose(moe(x.cuda()).out.cpu(), want, atol=1e-4), impl
        assert torch.allclose(moe(x.cuda()).out, oracle(x.cuda()).out, atol=1e-5), impl


def test_calibration_sees_training_images_only(monkeypatch):
    """QMoE's hygiene: evaluation data never enters a Hessian (the test split is only evaluated)."""
    from moevision.data import ImageDataset
    from moevision.techniques.qmoe import calibrate, pipeline

    def ds(value, n):
        return ImageDataset(torch.full((n, 1, 16, 16), value, dtype=torch.uint8), torch.arange(n) % 4, 4,
                            ("a", "b", "c", "d"), "hand", (0.5,), (0.25,))
    train, test = ds(10, 40), ds(200, 24)
    seen = []
    real = calibrate.gather_expert_inputs

    def spy(model, moe, batches):
        batches = list(batches)
        seen.extend(b.unique().tolist() for b in batches)
        return real(model, moe, batches)
    monkeypatch.setattr(calibrate, "gather_expert_inputs", spy)
    evaluated = []

    def evaluate(m, d):
        evaluated.append(d.images.unique().tolist())
        return {"accuracy": 0.0, "loss": 0.0}
    pipeline.run(_tiny_model(), train, test, pipeline.CompressOptions(calib_images=16, batch_size=8),
                 evaluate=evaluate, timing_images=4)
    assert pipeline.prediction_shift(_tiny_model(), _tiny_model(), _batches(1)) == (0.0, 1.0)
    train_value = (10 / 255 - 0.5) / 0.25
    assert seen and all(v == [pytest.approx(train_value)] for v in seen)
    assert evaluated == [[200], [200]]  # before and after, on the test split


def test_rate_search_keeps_the_candidate_closest_to_the_original_on_calibration_images():
    from moevision.techniques.qmoe.ratecontrol import build, search

    model, calib = _tiny_model(), _batches(1)
    q = QMoEConfig()
    target = build(model, calib, q).stats["bits_per_expert_param"] - 0.3
    best, rec = search(model, calib, q, target)
    assert rec["target_met"] and best.stats["bits_per_expert_param"] <= target
    met = [c for c in rec["candidates"] if c["calibration_kl"] is not None]
    assert met and best.distortion == min(c["calibration_kl"] for c in met) > 0
    assert all(c["bits_per_expert_param"] <= target for c in met)
    assert {c["percdamp"] for c in rec["candidates"]} <= {0.1, 1.0, 10.0}
    # each kept candidate is the smallest tried threshold meeting the budget at its damping
    for c in met:
        tried = [t["zero_threshold"] for t in rec["candidates"]
                 if t["percdamp"] == c["percdamp"] and t["bits_per_expert_param"] <= target]
        assert c["zero_threshold"] == min(tried)
