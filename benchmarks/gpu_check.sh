#!/usr/bin/env bash
# One short GPU session: correctness, then the layer and model benchmarks (JSON to $OUT or runs/).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-runs}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python benchmarks/gpu_correctness.py 2>&1 | tee "$OUT/gpu_correctness.txt"
python -m moevision bench moe-layer --device cuda --json "$OUT/bench_moe_layer_gpu.json" 2>&1 | tee "$OUT/bench_moe_layer_gpu.txt"
python -m moevision bench model --device cuda --json "$OUT/bench_model_gpu.json" 2>&1 | tee "$OUT/bench_model_gpu.txt"
