#!/usr/bin/env bash
# The GPU checks for a lent H100/H200, in one short run (about 5 minutes):
#   1. `dgemma train` on CUDA (the bundled Sudoku model, 40 steps, a checkpoint at 20), then a resumed run to 60;
#   2. `dgemma sudoku eval --device cuda`: the bundled models' solve rates and puzzles/s on the GPU;
#   3. benchmarks/gpu_bench.py at 26B-A4B shapes (dgemma diffusion vs its AR path vs transformers), shortened.
# Logs go to $OUT (default /tmp/gpu_check). On a machine without transformers' DiffusionGemma and without
# network access, put a transformers wheel in .whl/ and it is installed to /tmp/site.
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
OUT=${OUT:-/tmp/gpu_check}
DEVICE=${DEVICE:-cuda}
W=${WORK:-/tmp/gpu_check_work}
mkdir -p "$OUT" "$W"
dgemma() { python3 -c 'import sys; from dgemma.entrypoints.cli import main; sys.exit(main())' "$@"; }

echo "== 1. training on $DEVICE"
python3 - "$W/data.jsonl" <<'EOF'
import json, sys
from dgemma.tasks import sudoku as S
from dgemma.tasks.sudoku_model import to_examples
import random
rng = random.Random(0)
items = []
for _ in range(256):
    p, sol = S.generate(rng.randint(30, 45), rng)
    items.append({"puzzle": p, "solution": sol})
with open(sys.argv[1], "w") as f:
    for e in to_examples(items):
        f.write(json.dumps({"prompt_ids": e.prompt, "completion_ids": e.response, "fixed": e.fixed}) + "\n")
EOF
rm -rf "$W/run"
t0=$(date +%s.%N)
dgemma train --model dgemma/models/sudoku --data "$W/data.jsonl" --output "$W/run" --steps 40 --batch-size 32 \
  --lr 1e-4 --ar-weight 0 --no-prompt-loss --save-every 20 --log-every 10 --device "$DEVICE" --quiet \
  && echo "train 40 steps: $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s (load + save included)"
# resume: the newest checkpoint-N is step 20 (final/ is not one); training goes on to step 60
dgemma train --model dgemma/models/sudoku --data "$W/data.jsonl" --output "$W/run" --steps 60 --batch-size 32 \
  --lr 1e-4 --ar-weight 0 --no-prompt-loss --save-every 20 --log-every 10 --device "$DEVICE" --quiet \
  && python3 - "$W/run/train_log.jsonl" <<'EOF'
import json, sys
log = [json.loads(l) for l in open(sys.argv[1])]
print("resumed run log (step, loss):", [(e["step"], round(e["loss"], 4)) for e in log])
EOF

echo "== 2. sudoku eval on $DEVICE"
dgemma sudoku eval --device "$DEVICE" --per-difficulty "${PER_DIFFICULTY:-50}" --batch-size 64 --quiet \
  --variants diffusion+clamp,diffusion,diffusion+clamp+vote,ar 2>&1 | tee "$OUT/sudoku_eval.txt"

echo "== 3. generation benchmark (26B-A4B shapes, random bf16 weights)"
if [ "$DEVICE" = cuda ]; then
  timeout "${BENCH_TIMEOUT:-200}" python3 benchmarks/gpu_bench.py --device cuda --batch-sizes "${BATCH_SIZES:-1,8}" \
    --steps 16 --max-new-tokens 256 2>&1 | tee "$OUT/gpu_bench.txt"
else
  python3 benchmarks/gpu_bench.py --tiny --device cpu --batch-sizes 1,2 --steps 2 --max-new-tokens 32 2>&1 \
    | tee "$OUT/gpu_bench.txt"
fi
