#!/usr/bin/env bash
# One call on a lent GPU machine: the training-step benchmark at SD-1.5's real architecture
# (random weights, 512 px, batch 4, bf16), plus the tiny model on the same GPU.
# The machine has torch/transformers but not diffusers or pydantic: they travel as wheels in .whl/.
#   (device) bash benchmarks/gpu_check.sh      -> results in $OUT
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
python3 benchmarks/train_step.py --model sd15 --device cuda --precision bf16 --batch-size 4 --reps 5 --steps 10 --warmup 3 \
    --json "$OUT/sd15-bf16.json" 2>&1 | tee "$OUT/sd15-bf16.log"
python3 benchmarks/train_step.py --model tiny --device cuda --precision fp32 --batch-size 4 --reps 5 --steps 20 --warmup 5 \
    --json "$OUT/tiny-cuda.json" 2>&1 | tee "$OUT/tiny-cuda.log"
