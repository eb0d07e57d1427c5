#!/usr/bin/env bash
# Table 1 on a GPU (H200) for one model, in steps of one device call each (each under the 10-minute
# limit; runs/ and the installed bundle persist while the machine stays warm). It writes the result
# groups that `make paper MODEL=<model>` reads (evals/paper_table.py) under $OUT/results.
#
#   bash scripts/gpu_paper_session.sh install PART...          # each part of .bundle-<model>/ (carry it)
#   bash scripts/gpu_paper_session.sh calibrate MODEL           # default bound (l1 0.08) and tight (0.03)
#   bash scripts/gpu_paper_session.sh suite MODEL SUITE [tight|austen|austen-tight]
#   bash scripts/gpu_paper_session.sh table MODEL               # results -> results/paper/table1-MODEL.md
#
# SUITE: ppl, niah, ruler (when the checkout has it), speed. Lengths: 8K/16K/32K within the model's
# context (smollm2: 8K). Methods: dense, sparge, sparge-topk, minference, flexprefill, sparge-budget at
# the default config's per-layer density; `tight` runs sparge at the tight config; `austen` runs ppl on
# the second corpus. Copy $OUT/results into the repository's results/ and commit.
set -uo pipefail
OUT=${OUT:-/tmp/out}
export PYTHONPATH=$HOME/.cache/sparge/site-packages:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p runs "$OUT/results"
step() { local name=$1 limit=$2; shift 2; echo "== $name ($(date +%T))"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?"; tail -n 30 "$OUT/$name.log"; }
gpu=$(python3 -c "import torch; n = torch.cuda.get_device_name().lower(); print(next((t for t in ('h200', 'h100', 'b200', 'a100') if t in n), n.split()[-1]))")
context() { case "$1" in smollm2) echo 8192 ;; *) echo 32768 ;; esac; }
lengths() { local ctx; ctx=$(context "$1"); shift; for L in "$@"; do [ "$L" -le "$ctx" ] && printf '%s ' "$L"; done; }
METHODS="dense sparge sparge-topk minference flexprefill sparge-budget"
cmd=${1:?install|calibrate|suite|table}; shift
case "$cmd" in
  install)
    for part in "$@"; do bash scripts/offline_install.sh "$part" || exit 1; done ;;
  calibrate)
    m=$1
    step "calibrate-$m" 560 python3 -m calibrate --model "$m" --samples 5 --holdout 8 --seq-len 8192 --device cuda \
      --capture-dir "runs/$m.capture" --out "runs/$m.json" --quiet
    step "calibrate-$m-tight" 560 python3 -m calibrate --model "$m" --samples 5 --holdout 8 --seq-len 8192 \
      --device cuda --l1 0.03 --pv-l1 0.035 --capture-dir "runs/$m.capture" --out "runs/$m-tight.json" --quiet
    mkdir -p "$OUT/results/calibration"
    cp "runs/$m.json" "$OUT/results/calibration/$m-$gpu.json"
    cp "runs/$m-tight.json" "$OUT/results/calibration/$m-tight-$gpu.json"
    cp "runs/$m.capture/timing.json" "$OUT/$m-capture-timing.json" 2>/dev/null ;;
  suite)
    m=$1 suite=$2 variant=${3:-main}
    case "$suite" in
      ppl) extra=(--lengths $(lengths "$m" 8192 16384 32768) --windows 4) ;;
      *) extra=(--lengths $(lengths "$m" 4096 8192 16384 32768)) ;;
    esac
    config="runs/$m.json" methods=$METHODS group=$m
    case "$variant" in
      tight) config="runs/$m-tight.json" methods=sparge group="$m-tight" ;;
      austen) extra+=(--data austen) group="$m-ppl-austen" ;;
      austen-tight) extra+=(--data austen) config="runs/$m-tight.json" methods=sparge group="$m-tight-ppl-austen" ;;
    esac
    tmp="runs/out-$group-$suite"
    rm -rf "$tmp"
    step "suite-$suite-$group" 590 python3 -m evals "$suite" --model "$m" --config "$config" --capture "runs/$m.capture" \
      --density matched --device cuda --methods $methods --out "$tmp" --quiet "${extra[@]}"
    mkdir -p "$OUT/results/$suite/$group"
    cp -r "$tmp/$suite/$m/." "$OUT/results/$suite/$group/" ;;
  table)
    python3 scripts/paper.py --model "$1" --out "$OUT/results" ;;
  *) echo "unknown step $cmd" >&2; exit 2 ;;
esac
