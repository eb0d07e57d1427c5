#!/usr/bin/env bash
# The H100 text session in steps, one device call each (the machine stays warm between calls; runs/
# and the installed bundle persist on it). Every step writes its logs and results under $OUT.
#
#   bash scripts/gpu_text_session.sh install .bundle/part-00N   # once per bundle part (carry that part)
#   bash scripts/gpu_text_session.sh calibrate [MARGIN...]       # capture 5 + 8 held-out 8K pydoc windows,
#                                                                # calibrate at each margin (default 1.0)
#   bash scripts/gpu_text_session.sh suites CONFIG SUITE...       # every method at matched density
#   bash scripts/gpu_text_session.sh checks                       # GPU pytest suite + search quality
#
# Commit provenance: a tree copied without git history reads the commit from .tree-commit
# (write it with `git rev-parse HEAD > .tree-commit` before the call).
set -uo pipefail
OUT=${OUT:-/tmp/out}
export PYTHONPATH=$HOME/.cache/sparge/site-packages:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p runs "$OUT"
step() { local name=$1 limit=$2; shift 2; echo "== $name ($(date +%T))"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?"; tail -n 40 "$OUT/$name.log"; }
cmd=${1:?install|calibrate|suites|checks}; shift
case "$cmd" in
  install)
    for part in "$@"; do bash scripts/offline_install.sh "$part" || exit 1; done ;;
  calibrate)
    margins=("$@"); [ ${#margins[@]} -gt 0 ] || margins=(1.0)
    for m in "${margins[@]}"; do
      step "calibrate-m$m" 420 python3 -m calibrate --model smollm2 --samples 5 --holdout 8 --seq-len 8192 \
        --device cuda --margin "$m" --capture-dir runs/smollm2.capture --out "runs/smollm2-m$m.json" --quiet
      cp "runs/smollm2-m$m.json" "runs/smollm2-m$m.png" "$OUT/" 2>/dev/null
    done
    cp runs/smollm2.capture/timing.json "$OUT/capture-timing.json" 2>/dev/null ;;
  suites)
    config=$1; shift
    for suite in "$@"; do
      case "$suite" in
        ppl) extra=(--lengths 2048 4096 8192 --windows 4) ;;
        niah) extra=(--lengths 2048 4096 8192) ;;
        longctx) extra=(--lengths 4096 7680 --per-task 2) ;;
        speed) extra=(--lengths 2048 4096 8192) ;;
        *) extra=() ;;
      esac
      step "suite-$suite" 560 python3 -m evals "$suite" --model smollm2 --config "$config" \
        --capture runs/smollm2.capture --density matched --device cuda --out "$OUT/results" --quiet "${extra[@]}"
    done
    tar czf "$OUT/results.tgz" -C "$OUT" results && rm -rf "$OUT/results" ;;
  checks)
    step pytest-gpu 300 python3 -m pytest -q -m gpu tests
    step search-quality 200 python3 scripts/search_quality.py --capture runs/smollm2.capture \
      --layers 0 5 10 15 20 25 29 --out "$OUT/search-quality.json" ;;
  *) echo "unknown step $cmd" >&2; exit 2 ;;
esac
