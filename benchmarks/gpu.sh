#!/usr/bin/env bash
# Paper-scale speed and memory on one CUDA GPU (issue 7), in under 10 minutes.
#
#   bash benchmarks/gpu.sh [--out DIR] [--only sampler,recognizer,reid,selection,dpok] [--peak-tflops 989]
#
# Randomly initialised DiT-XL/2 at 256^2 (latent 32x32x4, VAE of sd-vae-ft-ema's shape), bf16 autocast,
# SDPA attention; ResNet-50 at 256x128; ReID evaluation on GPU tensors; lookahead selection; one RewardDPOK
# round. Writes speed_gpu.json and speed_gpu.md to --out (default: $OUT if set, else
# benchmarks/results/gpu). Without CUDA it prints "skipped: no CUDA" and exits 0.
# PYTHON selects the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu}"
exec "${PYTHON:-python3}" -m benchmarks speed --gpu-scale --out "$out" "$@"
