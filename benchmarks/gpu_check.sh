#!/usr/bin/env bash
# GPU readiness check for microsnoop on a CUDA machine (see benchmarks/gpu_check.py):
#   embed bf16/fp16 on CUDA vs CPU fp32 (cosine >= 0.999, img/s), a short CUDA training run of every
#   registered method (img/s, its encoder checked the same way), and a 2-rank NCCL torchrun when >= 2 GPUs.
# Usage: benchmarks/gpu_check.sh [--cells N] [--steps N]      (exit 0 = all ok, 1 = a check failed, 2 = no GPU)
# Needs ../shared/data beside the repository (real yeast cells and the pretraining images).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python benchmarks/gpu_check.py "$@"
