#!/usr/bin/env bash
# One call on a lent GPU machine: the ShapesWorld quality benchmark on CUDA, with more seeds and
# steps than these 2 CPU cores allow. Records are written after every run, so a run cut short by
# QUALITY_TIMEOUT still returns what it measured (seed-major: every concept, fewer seeds).
# The machine has torch/transformers but not diffusers, pydantic or minio: they travel as wheels in .whl/ (gpu_env.sh).
#   (device) bash benchmarks/gpu_quality.sh --seeds 5 --steps 200      -> results in $OUT
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
timeout "${QUALITY_TIMEOUT:-480}" python3 benchmarks/quality.py --device cuda --out /tmp/quality "$@" 2>&1 | tee "$OUT/quality.log"
cp /tmp/quality/results.json /tmp/quality/table.md /tmp/quality/scatter.png "$OUT"/ 2>/dev/null
true
