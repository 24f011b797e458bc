#!/usr/bin/env bash
# The prepared GPU check for issue 4 (at most 570 s: run it with a 600 s limit on one H100/H200): correctness (every path, the Triton kernels
# and impl="triton", the gather/scatter-fused Triton grouped GEMMs,
# torch.compile of the fused layer), then the two target shapes - dense vs grouped vs fused, eager, CUDA
# graph, torch.compile and torch.compile replayed from a CUDA graph - then the ViT-B/16 vs V-MoE-B/16
# training step, eager, compiled and compiled with CUDA graphs (reduce-overhead). Each part has its own timeout and writes as it goes (to $OUT or runs/).
# Usage: benchmarks/gpu_quick.sh [all|correctness|layer|model|triton]  (one part alone: its timeout doubles)
# "triton" (not in "all", ~2-4 min): impl="triton" alone - its GPU tests (bf16 against the loop reference) and
# the two target shapes, dense vs fused vs triton, eager and replayed from a CUDA graph.
set -uo pipefail
PART="${1:-all}"; SCALE=1; [ "$PART" = all ] || SCALE=2
run_part() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-runs}"; mkdir -p "$OUT"
export TORCHINDUCTOR_CACHE_DIR=/tmp/moevision_inductor_cache
nvidia-smi --query-gpu=name --format=csv,noheader || true
if run_part correctness; then
timeout $((170 * SCALE)) python benchmarks/gpu_correctness.py > "$OUT/gpu_correctness.txt" 2>&1
echo "correctness rc=$? $(grep FAILURES "$OUT/gpu_correctness.txt")"; grep -E "FAIL|compiled|dynamo" "$OUT/gpu_correctness.txt"
fi
if run_part layer; then
timeout $((170 * SCALE)) python - <<'PY' 2>&1 | grep -v "^[EW][0-9]" | tee "$OUT/gpu_layer.txt"
import json, os, torch
from moevision.bench import bench_layer, GPU_SHAPES
dev = torch.device("cuda")
out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layer": []}
for s in GPU_SHAPES[:3:2]:  # ViT-B E8 k2 and ViT-S E8 k1
    rows = bench_layer(s, dev, torch.bfloat16, 20, impls=("grouped", "fused", "triton"), compile=True)
    out["layer"].append({"shape": s.name, "rows": rows})
    print(f"## {s.name}  (fwd+bwd time over dense: eager / CUDA graph / compiled / compiled + CUDA graph)")
    for r in rows:
        f = lambda v: "-" if v is None else f"{v:.2f}"
        print(f"{r['impl']:<20} fwd x{r['fwd_ratio']:.2f}  fwd+bwd x{r['fwdbwd_ratio']:.2f} ({r['fwdbwd_ms']:.3f} ms)  "
              f"graph x{f(r['graph_ratio'])}  compiled x{f(r['compiled_ratio'])}  compiled+graph x{f(r['compiled_graph_ratio'])}")
    json.dump(out, open(os.path.join(os.environ.get("OUT", "runs"), "gpu_layer.json"), "w"), indent=1)
PY
fi
if run_part model; then
timeout $((230 * SCALE)) python - <<'PY' 2>&1 | grep -v "^[EW][0-9]" | tee "$OUT/gpu_model.txt"
import json, os, torch
from moevision.bench import bench_model
dev = torch.device("cuda")
out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
for compiled in (False, "default", "reduce-overhead"):  # eager, compiled, compiled + CUDA graphs
    rows = bench_model(dev, torch.bfloat16, 10, compile=compiled, impls=("fused",))
    tag = compiled or "eager"
    out[tag] = rows
    for r in rows:
        print(f"{tag:<16} {r['model']:<32} {r['step_ms']:.1f} ms  x{r['ratio']:.2f}")
    json.dump(out, open(os.path.join(os.environ.get("OUT", "runs"), "gpu_model.json"), "w"), indent=1)
PY
fi
if [ "$PART" = triton ]; then
timeout 120 python - <<'PY' 2>&1 | tee "$OUT/gpu_triton_tests.txt"
import torch  # impl="triton" against the loop reference in bf16 and fp32 (what tests/test_triton_grouped.py's gpu test checks)
from moevision import MoE
bad = 0
for dtype in (torch.bfloat16, torch.float32):
    for k, act, bias in ((1, "gelu", True), (2, "gelu", True), (2, "silu", False), (3, "relu", True)):
        torch.manual_seed(k)
        ref = MoE(256, 512, 8, k, impl="loop", noise_std=0.0, activation=act, bias=bias).cuda().to(dtype)
        m = MoE(256, 512, 8, k, impl="triton", noise_std=0.0, activation=act, bias=bias).cuda().to(dtype)
        m.load_state_dict(ref.state_dict())
        x = torch.randn(4096, 256, device="cuda", dtype=dtype)
        res = []
        for mod in (ref, m):
            xr = x.clone().requires_grad_()
            o = mod(xr).out
            o.float().square().mean().backward()
            res.append([o.float(), xr.grad.float()] + [p.grad.float() for p in mod.parameters()])
        err = max(((a - b).norm() / a.norm().clamp_min(1e-12)).item() for a, b in zip(*res))
        ok = err < (3e-2 if dtype == torch.bfloat16 else 1e-4)
        bad += not ok
        print(f"triton vs loop {str(dtype):<15} k={k} {act:<5} bias={bias!s:<5} max rel err {err:.1e} {'ok' if ok else 'FAIL'}")
print("FAILURES:", bad)
PY
timeout 300 python - <<'PY' 2>&1 | grep -v "^[EW][0-9]" | tee "$OUT/gpu_triton_layer.txt"
import json, os, torch
from moevision.bench import bench_layer, GPU_SHAPES
dev = torch.device("cuda")
out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layer": []}
for s in GPU_SHAPES[:3:2]:  # ViT-B E8 k2 and ViT-S E8 k1
    rows = bench_layer(s, dev, torch.bfloat16, 20, impls=("fused", "triton"))
    out["layer"].append({"shape": s.name, "rows": rows})
    print(f"## {s.name}  (fwd / fwd+bwd over dense, eager; fwd+bwd replayed from a CUDA graph)")
    for r in rows:
        g = "-" if r["graph_ratio"] is None else f"{r['graph_ratio']:.2f}"
        print(f"{r['impl']:<20} fwd x{r['fwd_ratio']:.2f}  fwd+bwd x{r['fwdbwd_ratio']:.2f} ({r['fwdbwd_ms']:.3f} ms)  graph x{g}")
    json.dump(out, open(os.path.join(os.environ.get("OUT", "runs"), "gpu_triton_layer.json"), "w"), indent=1)
PY
fi
