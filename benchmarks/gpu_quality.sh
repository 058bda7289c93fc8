#!/usr/bin/env bash
# One call on a lent GPU machine: the ShapesWorld quality benchmark on CUDA, with more seeds and
# steps than these 2 CPU cores allow. Records are written after every run, so a run cut short by
# QUALITY_TIMEOUT still returns what it measured (seed-major: every concept, fewer seeds).
# The machine has torch/transformers but not diffusers, pydantic or minio: they travel as wheels in .whl/.
#   (device) bash benchmarks/gpu_quality.sh --seeds 5 --steps 200      -> results in $OUT
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${QUALITY_TIMEOUT:-480}" python3 benchmarks/quality.py --device cuda --out /tmp/quality "$@" 2>&1 | tee "$OUT/quality.log"
cp /tmp/quality/results.json /tmp/quality/table.md /tmp/quality/scatter.png "$OUT"/ 2>/dev/null
true
