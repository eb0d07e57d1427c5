#!/usr/bin/env bash
# Table 1 on a GPU (H200) for one or more models, as a list of steps per device call. Each call may
# carry wheel folders and bundle parts; they are installed / staged outside the repo copy (under
# $HOME/.cache/sparge), so parts can arrive over several calls while the machine stays warm. Results
# accumulate in $RES (outside the repo copy, kept between calls) and every call packs all of them into
# $OUT/paper-results.tgz, so the last call's archive holds everything measured so far.
#
#   bash scripts/gpu_paper_session.sh [--deadline S] [--end S] STEP...
#
# Steps (run in order; a step that would start after --deadline seconds is skipped and named; no step
# runs past --end seconds, so the call returns its archive before the device call's own limit):
#   calibrate:MODEL           time-objective calibration on one capture at three settings: the default
#                             bound (l1 0.08) and a tight one (l1 0.03) with the paper's forced blocks
#                             (--local-blocks 0), and the default bound with --local-blocks 1 (the
#                             calibration's default since) -> runs/MODEL{,-tight,-local1}.json; copies in
#                             results/calibration
#   suite:MODEL:SUITE[:VARIANT]   python -m evals SUITE; SUITE ppl, niah, ruler or speed; VARIANT main
#                             (dense, sparge and the rivals at the default config's per-layer density),
#                             tight, local1 (sparge at that config), austen, austen-tight, austen-local1
#                             (ppl on the second corpus)
#   table:MODEL               results -> results/paper/table1-MODEL.md
# Lengths: ppl 8K/16K/32K, the others 4K-32K, within the model's context (smollm2: 8K).
# Environment: METHODS (main variant's methods), PPL_WINDOWS (perplexity windows per length, 4; the
# pydoc text holds only 3 windows of 32K Qwen tokens), RULER_PER_TASK (items per RULER task and length, 10),
# RULER_GEN (cap on generated tokens, 64), CALIB_LEN (calibration window, 8192), COST (cost model; default
# results/kernel/<gpu>-cost-<model>-shape.json when present, else calibrate's default <gpu>-cost.json); for a CPU dry run of
# the steps: DEVICE (cuda), CALIB_ARGS (appended to the calibration's arguments), PPL_LENGTHS / OTHER_LENGTHS (instead of 8K/16K/32K and 4K-32K).
# Copy results out of the archive into the repository's results/ and commit.
set -uo pipefail
OUT=${OUT:-/tmp/out}
CACHE=$HOME/.cache/sparge
SITE=$CACHE/site-packages
RES=$CACHE/paper-results
export PYTHONPATH=$SITE:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p runs "$OUT" "$RES/calibration" "$SITE"
LOGS=$RES/logs; mkdir -p "$LOGS"
T0=$SECONDS
deadline=100000 hard_end=100000
while [ $# -gt 0 ]; do
    case "$1" in
        --deadline) deadline=$2; shift 2 ;;
        --end) hard_end=$2; shift 2 ;;
        *) break ;;
    esac
done

# wheels and bundle parts carried by this call
for w in .bundle-calib/wheels .bundle-lmeval/wheels; do
    [ -d "$w" ] || continue
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" --upgrade "$w"/*.whl \
        > "$LOGS/wheels-$(basename "$(dirname "$w")").log" 2>&1
    echo "wheels $w: rc=$?"
done
for part in .bundle-*/part-*; do
    [ -f "$part/BUNDLE.txt" ] || continue
    bash scripts/offline_install.sh --target "$SITE" "$part" >> "$LOGS/bundle.log" 2>&1
    echo "bundle $part: rc=$? ($(tail -n 1 "$LOGS/bundle.log"))"
done

DEVICE=${DEVICE:-cuda}
gpu=$(python3 -c 'from evals.environment import gpu_slug; print(gpu_slug())')
context() { case "$1" in smollm2) echo 8192 ;; *) echo 32768 ;; esac; }
lengths() { local ctx; ctx=$(context "$1"); shift; for L in "$@"; do [ "$L" -le "$ctx" ] && printf '%s ' "$L"; done; }
METHODS=${METHODS:-dense sparge sparge-topk minference flexprefill sparge-budget}
step() {  # NAME LIMIT CMD...: run with a time limit, log to $LOGS/NAME.log, print rc and the log's tail
    local name=$1 limit=$2; shift 2
    local left=$((hard_end - (SECONDS - T0)))  # no step runs past --end
    [ "$left" -lt "$limit" ] && limit=$left
    [ "$limit" -gt 0 ] || { echo "skipped (end): $name"; return 1; }
    echo "== $name ($(date +%T), $((SECONDS - T0)) s into the call, limit ${limit}s)"
    { echo "# $(date -u +%FT%TZ) tree $(cat .tree-commit 2>/dev/null) $gpu"; echo "# $*"; } > "$LOGS/$name.log"
    timeout "$limit" "$@" >> "$LOGS/$name.log" 2>&1
    local rc=$?
    echo "rc=$rc"; tail -n 6 "$LOGS/$name.log"
    return $rc
}

calibrate() {
    local m=$1 cost=${COST:-results/kernel/$gpu-cost-$m-shape.json} cost_arg=()
    [ -f "$cost" ] && cost_arg=(--cost-model "$cost")  # else calibrate's own default, results/kernel/<gpu>-cost.json
    local common=(--model "$m" --data pydoc --samples 5 --holdout 8 --seq-len "${CALIB_LEN:-8192}" --device "$DEVICE"
                  --objective time "${cost_arg[@]}" --estimator keys,pooled --capture-dir "runs/$m.capture" --quiet
                  ${CALIB_ARGS:-})
    step "calibrate-$m" 400 python3 -m calibrate "${common[@]}" --local-blocks 0 --out "runs/$m.json" &&
        cp "runs/$m.json" "$RES/calibration/$m-$gpu.json"
    step "calibrate-$m-tight" 200 python3 -m calibrate "${common[@]}" --local-blocks 0 --l1 0.03 --pv-l1 0.035 \
        --out "runs/$m-tight.json" && cp "runs/$m-tight.json" "$RES/calibration/$m-tight-$gpu.json"
    step "calibrate-$m-local1" 200 python3 -m calibrate "${common[@]}" --local-blocks 1 \
        --out "runs/$m-local1.json" && cp "runs/$m-local1.json" "$RES/calibration/$m-local1-$gpu.json"
    cp "runs/$m.capture/timing.json" "$RES/calibration/$m-capture-timing-$gpu.json" 2>/dev/null
    return 0
}

suite() {
    local m=$1 s=$2 variant=${3:-main} extra config methods group
    case "$s" in
        ppl) extra=(--lengths $(lengths "$m" ${PPL_LENGTHS:-8192 16384 32768}) --windows "${PPL_WINDOWS:-4}") ;;
        ruler) extra=(--lengths $(lengths "$m" ${OTHER_LENGTHS:-4096 8192 16384 32768}) --per-task "${RULER_PER_TASK:-10}"
                      --max-gen-toks "${RULER_GEN:-64}") ;;
        *) extra=(--lengths $(lengths "$m" ${OTHER_LENGTHS:-4096 8192 16384 32768})) ;;
    esac
    config="runs/$m.json" methods=$METHODS group=$m
    case "$variant" in
        main) ;;
        tight|local1) config="runs/$m-$variant.json" methods=sparge group="$m-$variant" ;;
        austen) extra+=(--data austen) group="$m-ppl-austen" ;;
        austen-tight|austen-local1) extra+=(--data austen) config="runs/$m-${variant#austen-}.json" methods=sparge
                                    group="$m-${variant#austen-}-ppl-austen" ;;
        *) echo "unknown variant $variant" >&2; return 2 ;;
    esac
    local tmp="runs/out-$group-$s"
    rm -rf "$tmp"
    step "suite-$s-$group" 590 python3 -m evals "$s" --model "$m" --config "$config" --capture "runs/$m.capture" \
        --density matched --device "$DEVICE" --methods $methods --out "$tmp" --quiet "${extra[@]}"
    local rc=$?
    mkdir -p "$RES/$s/$group"
    cp -r "$tmp/$s/$m/." "$RES/$s/$group/" 2>/dev/null
    return $rc
}

for spec in "$@"; do
    if [ $((SECONDS - T0)) -ge "$deadline" ]; then echo "skipped (deadline): $spec"; continue; fi
    IFS=: read -r what a b c <<< "$spec"
    case "$what" in
        calibrate) calibrate "$a" ;;
        suite) suite "$a" "$b" "${c:-main}" ;;
        table) step "table-$a" 60 python3 scripts/paper.py --model "$a" --out "$RES" ;;
        *) echo "unknown step $spec" >&2 ;;
    esac
done
tar czf "$OUT/paper-results.tgz" -C "$CACHE" paper-results && ls -la "$OUT"
