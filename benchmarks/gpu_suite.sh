#!/usr/bin/env bash
# One prepared GPU session (H100/H200): training-step throughput of the paper's pairing, GPU
# inference of the fused student against the teacher, and a short CUDA training of the demo.
# Usage: bash benchmarks/gpu_suite.sh OUT_DIR   (runs from the repository root without installing)
# Leaves five files in OUT_DIR: suite.log and four JSON results.
set -uo pipefail
out=${1:?usage: gpu_suite.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
exec > >(tee "$out/suite.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
python3 benchmarks/train_throughput.py --preset paper --device cuda --amp bf16 --batch 128 --steps 10 --rounds 3 \
  --json "$out/train_throughput.json"
python3 benchmarks/gpu_inference.py --modes eager graph --rounds 3 --json "$out/gpu_inference.json"
timeout 240 python3 -m cskd train --no-progress train.epochs=3 data.workers=4 output=/tmp/demo-cuda
cp /tmp/demo-cuda/metrics.jsonl "$out/demo_cuda_metrics.jsonl"
timeout 150 python3 benchmarks/gpu_inference.py --modes compile --rounds 2 --json "$out/gpu_compile.json"
