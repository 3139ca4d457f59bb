#!/usr/bin/env bash
# The one device check of issue 8, for a session that is lent a GPU (never run so far: no GPU was lent).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh      # on the GPU machine, from the repository root
#
# Writes under $OUT: gpu.csv (nvidia-smi), cuda_tests.txt (tests/test_devices.py: strategies agree on
# CUDA, flags equal to the CPU's, batch invariance, no host sync per class, the service on CUDA),
# bench_gga_cuda.{md,json} (ours vs the official all-classes loop at N = C, 5, 3 for the MNIST CNN and
# the 100-class CIFAR model, batch sizes up to 1024). Each step is bounded; the whole run takes
# about 6 minutes. The device image has torch, numpy, safetensors, pytest and prometheus-client; the
# service test needs fastapi, uvicorn, pydantic, pydantic-settings, python-multipart and
# fastapi-offline carried as wheels (see the device tool's README), else it is skipped.
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
timeout 180 python3 -m pytest -q -rs -p no:cacheprovider tests/test_devices.py > "$OUT/cuda_tests.txt" 2>&1
echo "pytest exit $?" >> "$OUT/cuda_tests.txt"
timeout 300 python3 -m benchmarks.bench_gga --device cuda --models mnist,cifar100 --batch-sizes 1,64,256,1024 \
    --json "$OUT/bench_gga_cuda.json" > "$OUT/bench_gga_cuda.md" 2>&1
echo "bench_gga exit $?" >> "$OUT/bench_gga_cuda.md"
