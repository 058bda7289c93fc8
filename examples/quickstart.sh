#!/usr/bin/env bash
# The whole loop on the embedded default: no cluster, no object store, nothing downloaded.
# Uses ShapesWorld, the small text-to-image model bundled with oneword: draws five images of a
# yellow star, learns the new word <my-star> from them, then renders "a photo of a <my-star>"
# and edited prompts ("a photo of a red <my-star>") and reads the results with ShapesWorld's
# oracle. Every step is a plain `oneword` command. About 3 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
OUT=${1:-quickstart-output}
oneword=.venv/bin/oneword
run() { echo "+ $*" >&2; "$@"; }

run $oneword example-images "$OUT/images" --shape star --colour yellow --count 5
# the shipped `shapesworld` recipe (`oneword recipes shapesworld` shows it; docs/quality.md): the init
# word chosen from the images among the members of the class "shape" (here the model's own "star"),
# a light pull toward it, the moving average of the iterates, and edit consistency: colours the
# images do not have ("green <my-star>") must act on the new word as they act on other shapes, so
# the word leaves its colour to the prompt
run $oneword train --recipe shapesworld --class-word shape --images "$OUT/images" --name my-star \
    --base-model shapesworld --out "$OUT/my-star" --export a1111 --resume
run $oneword shapesworld-score --concept "$OUT/my-star/learned_embeds.safetensors" --shape star --colour yellow \
    --compare shape --compare star --out "$OUT/my-star-grid.png"
run $oneword generate --base-model shapesworld --concept "$OUT/my-star/learned_embeds.safetensors" \
    "a photo of a purple <my-star>" --n 4 --guidance-scale 5 --out "$OUT/purple-my-star.png"

echo
echo "done: concept in $OUT/my-star/ (learned_embeds.safetensors for diffusers, my-star.a1111.pt, loss.jsonl);"
echo "      $OUT/my-star-grid.png: first row 'a photo of a <my-star>', then one row per edited colour"
