"""Smoke test of the expert-parallel code path on one GPU with NCCL (world size 1), or gloo on CPU.

    python benchmarks/ep_smoke.py [--out results.json]

A one-rank NCCL process group runs the real layer path: ``shard_experts(..., force=True)`` (a 1-rank
EP group), the count exchange, the autograd all-to-all, the padded all-reduce MAX and the weight
all-gather. Checks, for the ragged (dropless), padded (capacity) and gather layouts: outputs and
gradients equal the local ``sorted`` layer in float32; then times forward + backward of both in
bfloat16 (tokens/s); then trains 30 steps of the tiny MoE ViT through ``fit`` under the same process
group (parallel.ep=1: gradient all-reduce, distributed checkpoint, rank-0 writes) and reloads its
model directory. Without CUDA it runs on gloo/CPU
at a smaller size. Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _timeit(fn, iters: int, cuda: bool) -> float:
    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write the results as JSON")
    args = p.parse_args()
    from moevision import distributed as mvd
    from moevision.distributed.testing import free_port
    from moevision.moe import MoE

    cuda = torch.cuda.is_available()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    device = mvd.init_distributed("nccl" if cuda else "gloo", "cuda" if cuda else "cpu")
    backend = torch.distributed.get_backend()
    mesh = mvd.build_mesh(1)
    D, F, E, K, T = (1024, 4096, 8, 2, 16384) if cuda else (128, 256, 8, 2, 1024)
    res = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "backend": backend, "torch": torch.__version__,
           "shape": {"D": D, "F": F, "E": E, "K": K, "tokens": T}, "checks": {}, "tokens_per_s": {}}
    ok = True
    for layout, cf in (("ragged", None), ("padded", 1.25), ("gather", 1.25)):
        torch.manual_seed(0)
        ref = MoE(D, F, E, K, capacity_factor=cf, noise_std=0.0, impl="sorted").to(device)
        ep = mvd.shard_experts(copy.deepcopy(ref), mesh, layout=layout, force=True)
        x = torch.randn(T, D, device=device)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        oa, ob = ref(xa), ep(xb)
        (oa.out.square().mean() + oa.aux_loss).backward()
        (ob.out.square().mean() + ob.aux_loss).backward()
        err = {"out": (oa.out - ob.out).abs().max().item(), "x_grad": (xa.grad - xb.grad).abs().max().item(),
               "w1_grad": (ref.experts.w1.grad - ep.experts.w1.grad).abs().max().item()}
        scale = oa.out.abs().max().item()
        passed = all(v <= 1e-4 * max(scale, 1.0) for v in err.values())
        ok &= passed
        res["checks"][layout] = {**err, "passed": passed}
        for name, layer in (("local sorted", ref), (f"expert parallel ({layout})", ep)):
            layer.to(torch.bfloat16 if cuda else torch.float32)
            xx = x.to(torch.bfloat16 if cuda else torch.float32).requires_grad_()

            def step():
                o = layer(xx)
                (o.out.float().square().mean() + o.aux_loss).backward()
            res["tokens_per_s"][f"{name}, {'dropless' if cf is None else f'capacity {cf}'}"] = T / _timeit(step, 10, cuda)
        print(layout, res["checks"][layout], flush=True)

    # the training loop under the same process group: DP path, all-reduce, rank-0 writes, full model
    from moevision import config as C
    from moevision import from_pretrained
    from moevision.recipes import get_recipe
    from moevision.train import fit

    cfg = get_recipe("smoke_synthetic")
    for k, v in {"train.max_steps": 30, "train.device": "cuda" if cuda else "cpu", "train.epochs": 2}.items():
        C.set_by_path(cfg, k, v)
    C.validate_config(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        s = fit(cfg, Path(tmp) / "run", progress=False, log=lambda *_: None)
        m = from_pretrained(Path(tmp) / "run" / "model")
        res["fit"] = {"test_accuracy": s["test_accuracy"], "steps": s["steps"], "world_size": s.get("world_size"),
                      "reloaded_experts": int(m.blocks[1].mlp.experts.w1.shape[0])}
    ok &= s["steps"] == 30 and res["fit"]["reloaded_experts"] == cfg.model.num_experts
    res["passed"] = bool(ok)
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    torch.distributed.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
