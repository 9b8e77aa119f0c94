#!/usr/bin/env bash
# One short GPU check on a lent H100/H200: 26B-A4B shapes, random bf16 weights, fixed steps,
# dgemma vs its AR path vs transformers' reference, plus a roofline line. Prints a table and a JSON line.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
git rev-parse --short HEAD 2>/dev/null || true
python -m pip install -q -e . "transformers==5.23.0" >/dev/null 2>&1 || true
python benchmarks/gpu_bench.py --device cuda --batch-sizes "${BATCH_SIZES:-1,2,4,8}" --steps "${STEPS:-16}" "$@"
