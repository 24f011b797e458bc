#!/usr/bin/env bash
# A short GPU re-check (~2 min): correctness, then the two issue-4 target shapes (dense / grouped /
# fused with and without Triton, eager and CUDA graph) and the ViT-B model step. Outputs to $OUT or runs/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-runs}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader || true
timeout 100 python benchmarks/gpu_correctness.py > "$OUT/gpu_correctness.txt" 2>&1; echo "correctness rc=$? $(grep FAILURES "$OUT/gpu_correctness.txt")"
timeout 120 python - <<'PY' 2>&1 | tee "$OUT/gpu_quick.txt"
import json, os, torch
from moevision.bench import bench_layer, bench_model, GPU_SHAPES
dev = torch.device("cuda")
out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layer": [], "model": None}
for s in GPU_SHAPES[:3:2]:  # ViT-B E8 k2 and ViT-S E8 k1
    rows = bench_layer(s, dev, torch.bfloat16, 20, impls=("grouped", "fused"))
    out["layer"].append({"shape": s.name, "rows": rows})
    print(f"## {s.name}")
    for r in rows:
        g = r["graph_ratio"]
        print(f"{r['impl']:<20} fwd x{r['fwd_ratio']:.2f}  fwd+bwd x{r['fwdbwd_ratio']:.2f} ({r['fwdbwd_ms']:.3f} ms)  "
              f"graph x{'-' if g is None else f'{g:.2f}'}")
rows = bench_model(dev, torch.bfloat16, 10)
out["model"] = rows
for r in rows:
    print(f"{r['model']:<36} {r['step_ms']:.1f} ms  x{r['ratio']:.2f}")
json.dump(out, open(os.path.join(os.environ.get("OUT", "runs"), "gpu_quick.json"), "w"), indent=1)
PY
