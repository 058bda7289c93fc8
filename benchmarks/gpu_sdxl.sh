#!/usr/bin/env bash
# One call on a lent GPU machine (issue 19): the training-step benchmark at SDXL base's real
# architecture (random weights, 1024 px, bf16), batch 1 and 4, oneword against the baseline that
# mirrors diffusers' textual_inversion_sdxl.py. Diffusers and pydantic travel as wheels (gpu_env.sh).
#   (device) bash benchmarks/gpu_sdxl.sh      -> results in $OUT
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
for batch in 1 4; do
    python3 benchmarks/train_step.py --model sdxl --device cuda --precision bf16 --batch-size "$batch" \
        --reps 5 --steps 10 --warmup 3 --json "$OUT/sdxl-bf16-b$batch.json" 2>&1 | tee "$OUT/sdxl-bf16-b$batch.log"
done
