#!/usr/bin/env bash
# One call on a lent GPU machine: the training-step benchmark at SD-1.5's real architecture
# (random weights, 512 px, batch 4, bf16), plus the tiny model on the same GPU.
# The machine has torch/transformers but not diffusers or pydantic: they travel as wheels in .whl/ (gpu_env.sh).
#   (device) bash benchmarks/gpu_check.sh      -> results in $OUT
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
python3 benchmarks/train_step.py --model sd15 --device cuda --precision bf16 --batch-size 4 --reps 5 --steps 10 --warmup 3 \
    --json "$OUT/sd15-bf16.json" 2>&1 | tee "$OUT/sd15-bf16.log"
python3 benchmarks/train_step.py --model tiny --device cuda --precision fp32 --batch-size 4 --reps 5 --steps 20 --warmup 5 \
    --json "$OUT/tiny-cuda.json" 2>&1 | tee "$OUT/tiny-cuda.log"
