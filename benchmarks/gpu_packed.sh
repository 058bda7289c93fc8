#!/usr/bin/env bash
# One call on a lent GPU machine: packed training throughput at SD-1.5's architecture (random
# weights, 512 px, bf16, batch 4 per concept) for K = 1, 2, 4, 8, 16, with TFLOP/s, the share of
# the chip's bf16 peak and peak memory per K; then the tiny model on the same GPU.
#   (device) bash benchmarks/gpu_packed.sh      -> results in $OUT
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
python3 benchmarks/packed_throughput.py --model sd15 --device cuda --precision bf16 --batch-size 4 --packs 1,2,4,8,16 \
    --reps 3 --steps 5 --warmup 2 --json "$OUT/packed-sd15-bf16.json" 2>&1 | tee "$OUT/packed-sd15-bf16.log"
python3 benchmarks/packed_throughput.py --model tiny --device cuda --precision fp32 --batch-size 4 --packs 1,2,4,8,16 \
    --reps 5 --steps 20 --warmup 5 --json "$OUT/packed-tiny-cuda.json" 2>&1 | tee "$OUT/packed-tiny-cuda.log"
