#!/usr/bin/env bash
# The whole loop on the embedded default: no cluster, no object store, nothing downloaded.
# Builds the offline tiny model, draws five images of a yellow star, learns the word <my-star>
# from them, and renders it in a new prompt. Every step is a plain `oneword` command.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
OUT=${1:-quickstart-output}
oneword=.venv/bin/oneword
run() { echo "+ $*" >&2; "$@"; }

run $oneword tiny-model "$OUT/tiny-model"
run $oneword example-images "$OUT/images" --shape star --colour yellow --count 5
run $oneword train --images "$OUT/images" --name my-star --init-word shape \
    --base-model "$OUT/tiny-model" --out "$OUT/my-star" \
    --steps 200 --batch-size 4 --lr 5e-3 --export a1111 --resume
run $oneword generate --base-model "$OUT/tiny-model" \
    --concept "$OUT/my-star/learned_embeds.safetensors" \
    "a watercolour of <my-star> on a boat" --num-images 4 --out "$OUT/my-star-on-a-boat.png"

echo
echo "done: concept in $OUT/my-star/ (learned_embeds.safetensors, my-star.a1111.pt, loss.jsonl, samples.png);"
echo "      new prompt rendered to $OUT/my-star-on-a-boat.png"
