"""GPU diagnostic for impl="triton" (kernels/triton/grouped.py), bf16: (1) each tensor of the MoE layer
(out, grad x, every parameter grad) of loop / fused / triton in bf16 against an fp32 oracle (the loop in
fp32 on the same bf16-rounded weights and inputs); (2) each kernel variant (_gmm flags, _wgrad flags)
alone against fp32 torch, under the bf16 block config and alternatives; (3) per-kernel timings at the
ViT-B/16 E8 k2 shape against a dense torch.mm of the same FLOPs, and a block-config sweep; "gh": the
backward GEMM flag by flag (how the bf16 row-dot miscompile was found, see grouped.ROWDOT_IN_KERNEL),
the layer check with the row dot in and out of the kernel, and the expert MLP's time under block variants.
Results of session 12 (H200): docs/results/gpu/s12/.
Usage (GPU): PYTHONPATH=src python benchmarks/gpu_triton_diag.py [check|time|all|gh]"""
import sys
import time

import torch

from moevision import MoE
from moevision.kernels.triton import grouped as g

dev = "cuda"
PART = sys.argv[1] if len(sys.argv) > 1 else "all"
torch.backends.cuda.matmul.allow_tf32 = False


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def layer_check():
    T, D, F, E = 4096, 256, 512, 8
    for k in (1, 2):
        torch.manual_seed(k)
        ref = MoE(D, F, E, k, impl="loop", noise_std=0.0).to(dev).bfloat16()
        names = ["out", "gx"] + [n.split(".")[-1] for n, _ in ref.named_parameters()]
        x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
        res = {}
        for impl, dt in (("loop", torch.float32), ("loop", torch.bfloat16), ("fused", torch.bfloat16),
                         ("triton", torch.bfloat16)):
            m = MoE(D, F, E, k, impl=impl, noise_std=0.0).to(dev).to(dt)
            m.load_state_dict(ref.state_dict())
            xr = x.to(dt).clone().requires_grad_()
            o = m(xr).out
            o.float().square().mean().backward()
            res[f"{impl}-{str(dt)[6:]}"] = [o, xr.grad] + [p.grad for p in m.parameters()]
        orc = res["loop-float32"]
        for key, v in res.items():
            print(f"layer k={k} {key:<16}", " ".join(f"{n}={rel(a, b):.1e}" for n, a, b in zip(names, v, orc)),
                  flush=True)


def gh_check():
    """The backward GEMM gh = (gate * g_out[tok] @ W2^T) * act'(h) (+ the gate row dot) flag by flag."""
    import torch.nn.functional as Fn
    torch.manual_seed(0)
    A, T, D, F, E = 4096, 2048, 256, 512, 8
    offs, tok, perm = routing(A, T, E)
    bf = torch.bfloat16
    g_out = torch.randn(T, D, device=dev, dtype=bf)
    w2 = torch.randn(E, F, D, device=dev, dtype=bf) / 16
    h = torch.randn(A, F, device=dev, dtype=bf)
    y = torch.randn(A, D, device=dev, dtype=bf)
    scale = torch.rand(A, device=dev)
    S = seg(offs)
    base = torch.zeros(A, F, device=dev)
    ga = g_out.float()[tok]
    for e, s, t in S:
        base[s:t] = ga[s:t] @ w2[e].float().t()
    hf = h.float().requires_grad_()
    dgelu = torch.autograd.grad(Fn.gelu(hf).sum(), hf)[0]
    ref_rd = torch.empty(A, device=dev); ref_rd[perm] = (ga * y.float()).sum(1)
    for blocks in (g.BLOCKS[bf][0], (64, 64, 32, 4, 1)):
        tiles = g._tile_table(offs, A, blocks[0])
        r = {}
        for name, kw, ref in (("gt", {}, base), ("gt+s", dict(scale=scale), base * scale[:, None]),
                              ("gt+ag", dict(hact=h, act_grad=0), base * dgelu),
                              ("gt+s+ag", dict(scale=scale, hact=h, act_grad=0), base * scale[:, None] * dgelu),
                              ("gt+rd", "rd", base), ("all", "all", base * scale[:, None] * dgelu)):
            rd = torch.empty(A, device=dev)
            if kw == "rd":
                kw = dict(y=y, rd=rd, rd_idx=perm)
            elif kw == "all":
                kw = dict(scale=scale, hact=h, act_grad=0, y=y, rd=rd, rd_idx=perm)
            out = g._gmm(g_out, w2, offs, tiles, A, a_idx=tok, transpose_w=True, blocks=blocks, **kw)
            r[name] = rel(out, ref)
            if "rd" in kw:
                r[name + ":rd"] = rel(rd, ref_rd)
        print(f"gh {blocks}:", " ".join(f"{n}={v:.1e}" for n, v in r.items()), flush=True)


def vitb_routing(A, E, k):
    """Uniformly random expert ids for A token-major assignments: the expert-sorted order, the (E+1)
    segment offsets and the token of each sorted row."""
    torch.manual_seed(0)
    exp = torch.randint(0, E, (A,), device=dev)
    order = torch.sort(exp, stable=True).indices
    offs = torch.zeros(E + 1, dtype=torch.int64, device=dev)
    offs[1:] = torch.bincount(exp, minlength=E).cumsum(0)
    return order, offs, order // k


def layer_time():
    """impl="triton" expert MLP fwd+bwd at ViT-B/16 E8 k2 under block variants, against fused's layer."""
    bf = torch.bfloat16
    T, D, F, E, k = 12608, 768, 3072, 8, 2
    A = T * k
    order, offs, tok = vitb_routing(A, E, k)
    x = torch.randn(T, D, device=dev, dtype=bf, requires_grad=True)
    gates = torch.rand(A, device=dev, requires_grad=True)
    w1 = (torch.randn(E, D, F, device=dev, dtype=bf) / 30).requires_grad_()
    w2 = (torch.randn(E, F, D, device=dev, dtype=bf) / 50).requires_grad_()
    b1 = torch.zeros(E, F, device=dev, dtype=bf, requires_grad=True)
    b2 = torch.zeros(E, D, device=dev, dtype=bf, requires_grad=True)
    go = torch.randn(T, D, device=dev, dtype=bf)
    def step():
        out = g.expert_mlp_triton(x, gates, w1, b1, w2, b2, tok, order, offs, k, "gelu")
        out.backward(go)
    old = g.BLOCKS[bf]
    for name, blk, rk in (("current", old, True), ("rowdot torch", old, False),
                          ("wgrad 64,128,64,4,4", (old[0], (64, 128, 64, 4, 4)), False),
                          ("+ gmm 128,256,64,8,3", ((128, 256, 64, 8, 3), (64, 128, 64, 4, 4)), False),
                          ("+ gmm 64,128,64,4,4", ((64, 128, 64, 4, 4), (64, 128, 64, 4, 4)), False)):
        g.BLOCKS[bf], g.ROWDOT_IN_KERNEL = blk, rk
        print(f"triton expert MLP fwd+bwd {name:<24} {bench(step):.3f} ms", flush=True)
    g.BLOCKS[bf], g.ROWDOT_IN_KERNEL = old, True


def routing(A, T, E, seed=0):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.multinomial(torch.ones(E), A, replacement=True, generator=gen).bincount(minlength=E)
    counts[1] += counts[0]; counts[0] = 0  # an empty expert
    offs = torch.zeros(E + 1, dtype=torch.int64)
    offs[1:] = counts.cumsum(0)
    tok = torch.randint(0, T, (A,), generator=gen)
    perm = torch.randperm(A, generator=gen)
    return offs.to(dev), tok.to(dev), perm.to(dev)


def seg(offs):
    o = offs.tolist()
    return [(e, o[e], o[e + 1]) for e in range(len(o) - 1)]


def kernel_check(blocks_list):
    torch.manual_seed(0)
    A, T, K, N, E = 3000, 3000, 256, 384, 6
    offs, tok, perm = routing(A, T, E)
    bf = torch.bfloat16
    x = torch.randn(T, K, device=dev, dtype=bf)
    xa = torch.randn(A, K, device=dev, dtype=bf)
    w = torch.randn(E, K, N, device=dev, dtype=bf) / 16
    wt = torch.randn(E, N, K, device=dev, dtype=bf) / 16
    bias = torch.randn(E, N, device=dev, dtype=bf)
    scale = torch.rand(A, device=dev)
    y = torch.randn(A, K, device=dev, dtype=bf)
    S = seg(offs)

    def mm_ref(af, W, trans=False):
        out = torch.zeros(A, N, device=dev)
        for e, s, t in S:
            We = W[e].float().t() if trans else W[e].float()
            out[s:t] = af[s:t] @ We
        return out

    for blocks in blocks_list:
        tiles = g._tile_table(offs, A, blocks[0])
        r = {}
        r["plain"] = rel(g._gmm(xa, w, offs, tiles, A, blocks=blocks), mm_ref(xa.float(), w))
        r["gather"] = rel(g._gmm(x, w, offs, tiles, A, a_idx=tok, blocks=blocks), mm_ref(x.float()[tok], w))
        r["transW"] = rel(g._gmm(xa, wt, offs, tiles, A, transpose_w=True, blocks=blocks), mm_ref(xa.float(), wt, True))
        ref_b = mm_ref(xa.float(), w) + torch.cat([bias[e].float().expand(t - s, N) for e, s, t in S])
        pre = torch.empty(A, N, device=dev, dtype=bf)
        out = g._gmm(xa, w, offs, tiles, A, bias=bias, pre=pre, blocks=blocks)
        r["bias"], r["pre"] = rel(out, ref_b), rel(pre, ref_b)
        r["scale"] = rel(g._gmm(xa, w, offs, tiles, A, scale=scale, blocks=blocks), mm_ref(xa.float(), w) * scale[:, None])
        o = g._gmm(xa, w, offs, tiles, A, out_idx=perm, blocks=blocks)
        ref_s = torch.empty(A, N, device=dev); ref_s[perm] = mm_ref(xa.float(), w)
        r["scatter"] = rel(o, ref_s)
        rd = torch.empty(A, device=dev)
        g._gmm(xa, w, offs, tiles, A, y=y, rd=rd, rd_idx=perm, blocks=blocks)
        ref_rd = torch.empty(A, device=dev); ref_rd[perm] = (xa.float() * y.float()).sum(1)
        r["rowdot"] = rel(rd, ref_rd)
        # wgrad: dW[e] = X_e^T G_e
        wb = g.BLOCKS[bf][1] if blocks is g.BLOCKS[bf][0] else (min(blocks[0], 64), blocks[2], blocks[1], blocks[3], blocks[4])
        gg = torch.randn(A, N, device=dev, dtype=bf)
        gT = torch.randn(T, N, device=dev, dtype=bf)
        def wref(X, G):
            return torch.stack([X[s:t].float().t() @ G[s:t].float() for e, s, t in S])
        dw = torch.empty(E, K, N, device=dev, dtype=bf)
        db = torch.empty(E, N, device=dev, dtype=bf)
        g._wgrad(xa, gg, offs, dw, db, blocks=wb)
        r["wg"] = rel(dw, wref(xa, gg))
        r["wg_db"] = rel(db, torch.stack([gg[s:t].float().sum(0) for e, s, t in S]))
        g._wgrad(x, gg, offs, dw, None, x_idx=tok, blocks=wb)
        r["wg_xidx"] = rel(dw, wref(x[tok], gg))
        g._wgrad(xa, gT, offs, dw, None, g_idx=tok, g_scale=scale, blocks=wb)
        r["wg_gidx"] = rel(dw, wref(xa, gT.float()[tok] * scale[:, None]))
        print(f"kernels {blocks} / wgrad {wb}:", " ".join(f"{n}={v:.1e}" for n, v in r.items()), flush=True)


def bench(fn, n=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record(); fn(); e.record(); torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return sorted(ts)[n // 2]


def timing():
    T, D, F, E, k = 12608, 768, 3072, 8, 2
    A = T * k
    bf = torch.bfloat16
    order, offs, tok = vitb_routing(A, E, k)
    x = torch.randn(T, D, device=dev, dtype=bf)
    w1 = torch.randn(E, D, F, device=dev, dtype=bf) / 30
    w2 = torch.randn(E, F, D, device=dev, dtype=bf) / 50
    b1 = torch.randn(E, F, device=dev, dtype=bf)
    gate = torch.rand(A, device=dev)
    h = torch.randn(A, F, device=dev, dtype=bf); a = torch.randn(A, F, device=dev, dtype=bf)
    y = torch.randn(A, D, device=dev, dtype=bf); gout = torch.randn(T, D, device=dev, dtype=bf)
    gh = torch.randn(A, F, device=dev, dtype=bf)
    dense_a = torch.randn(A, D, device=dev, dtype=bf); dense_w = torch.randn(D, F, device=dev, dtype=bf)
    t_dense = bench(lambda: dense_a @ dense_w)
    print(f"dense mm (A x D) @ (D x F): {t_dense:.3f} ms  [every kernel below has these FLOPs]", flush=True)
    gm_cfgs = [g.BLOCKS[bf][0], (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
               (256, 128, 64, 8, 3), (128, 128, 32, 4, 4)]
    wg_cfgs = [g.BLOCKS[bf][1], (32, 128, 128, 4, 3), (64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (128, 128, 128, 8, 3),
               (64, 128, 256, 8, 3), (32, 64, 64, 4, 4)]
    for cfg in gm_cfgs:
        try:
            tiles = g._tile_table(offs, A, cfg[0])
            pre = torch.empty(A, F, device=dev, dtype=bf)
            t1 = bench(lambda: g._gmm(x, w1, offs, tiles, A, a_idx=tok, bias=b1, act=0, pre=pre, blocks=cfg))
            t2 = bench(lambda: g._gmm(a, w2, offs, tiles, A, pre=y, scale=gate, out_idx=order, blocks=cfg))
            rd = torch.empty(A, device=dev)
            t3 = bench(lambda: g._gmm(gout, w2, offs, tiles, A, a_idx=tok, scale=gate, hact=h, act_grad=0, y=y, rd=rd,
                                      rd_idx=order, transpose_w=True, blocks=cfg))
            t4 = bench(lambda: g._gmm(gh, w1, offs, tiles, A, out_idx=order, transpose_w=True, blocks=cfg))
            print(f"gmm {cfg}: fwd1 x{t1 / t_dense:.2f} fwd2 x{t2 / t_dense:.2f} bwd_gh x{t3 / t_dense:.2f} "
                  f"bwd_gx x{t4 / t_dense:.2f}", flush=True)
        except Exception as ex:  # noqa: BLE001
            print(f"gmm {cfg}: {type(ex).__name__}: {str(ex)[:150]}", flush=True)
    for cfg in wg_cfgs:
        try:
            gw2 = torch.empty_like(w2); gb2 = torch.empty(E, D, device=dev, dtype=bf)
            gw1 = torch.empty_like(w1); gb1 = torch.empty(E, F, device=dev, dtype=bf)
            t5 = bench(lambda: g._wgrad(a, gout, offs, gw2, gb2, g_idx=tok, g_scale=gate, blocks=cfg))
            t6 = bench(lambda: g._wgrad(x, gh, offs, gw1, gb1, x_idx=tok, blocks=cfg))
            print(f"wgrad {cfg}: gw2 x{t5 / t_dense:.2f} gw1 x{t6 / t_dense:.2f}", flush=True)
        except Exception as ex:  # noqa: BLE001
            print(f"wgrad {cfg}: {type(ex).__name__}: {str(ex)[:150]}", flush=True)


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    t0 = time.time()
    if PART == "gh":
        gh_check()
        for rk in (True, False):
            g.ROWDOT_IN_KERNEL = rk
            print("ROWDOT_IN_KERNEL", rk, flush=True)
            layer_check()
        layer_time()
    if PART in ("check", "all"):
        layer_check()
        bf = torch.bfloat16
        kernel_check([g.BLOCKS[bf][0], g.BLOCKS[torch.float32][0], (128, 128, 64, 8, 1), (64, 64, 32, 4, 1)])
    if PART in ("time", "all"):
        timing()
    print(f"done in {time.time() - t0:.0f} s")
