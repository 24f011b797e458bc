#!/usr/bin/env bash
# One short GPU session: correctness, the profile, then the layer and model benchmarks (to $OUT or runs/).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-runs}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" || true
timeout 150 python benchmarks/gpu_correctness.py 2>&1 | tee "$OUT/gpu_correctness.txt"
timeout 100 python benchmarks/gpu_profile.py --rows 25 2>&1 | tee "$OUT/gpu_profile.txt"
# the benchmarks through moevision.bench directly (same code as `moevision bench ...`)
for spec in "moe-layer 20 180" "model 10 120"; do
  set -- $spec
  timeout "$3" python -c "import argparse, sys; from moevision.bench import run_bench; sys.exit(run_bench(argparse.Namespace(
what='$1', device='cuda', dtype=None, shapes=None, repeats=$2, batch=None, json='$OUT/bench_$1_gpu.json')))" 2>&1 | tee "$OUT/bench_$1_gpu.txt"
done
