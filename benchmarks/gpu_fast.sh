#!/usr/bin/env bash
# The fast-step measurement for a lent H100/H200, one run of about 5 minutes:
#   here:   pip download --no-deps transformers==5.23.0 -d .whl && git rev-parse --short HEAD > .commit
#   device: run(command="bash benchmarks/gpu_fast.sh", carry=[".whl", ".commit"], timeout_s=480)
# Results: $OUT/gpu_fast.txt (table) and $OUT/gpu_fast.jsonl (one JSON line per measurement, written as measured).
# On a machine without CUDA it dry-runs the script on tiny shapes.
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
OUT=${OUT:-/tmp/gpu_fast}
mkdir -p "$OUT"
if python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/gpu_fast.py --out "$OUT/gpu_fast.jsonl" "$@" 2>&1 \
    | tee "$OUT/gpu_fast.txt"
else
  python3 benchmarks/gpu_fast.py --tiny --device cpu --steps 2 --prompt-len 16 --out "$OUT/gpu_fast.jsonl" "$@" 2>&1 \
    | tee "$OUT/gpu_fast.txt"
fi
