"""Imported by every Python process on the device machine (benchmarks/device/setup.sh puts this folder on
PYTHONPATH): float32 matrix products on TF32 tensor cores, as the pipeline's CUDA stages were run."""

import torch

torch.set_float32_matmul_precision("high")
