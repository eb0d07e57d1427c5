#!/usr/bin/env bash
# Table 1 on a GPU (H200) for one or more models, as a list of steps per device call. Each call may
# carry wheel folders and bundle parts; they are installed / staged outside the repo copy (under
# $HOME/.cache/sparge), so parts can arrive over several calls while the machine stays warm. Results
# accumulate in $RES (outside the repo copy, kept between calls) and every call packs all of them into
# $OUT/paper-results.tgz, so the last call's archive holds everything measured so far.
#
#   bash scripts/gpu_paper_session.sh [--deadline S] [--end S] [--background NAME] [--wait S] STEP...
#
# --background NAME: stage what this call carries, then run the steps detached (setsid) as runner NAME
#   and return: the runner outlives the call while the machine stays warm, so later calls can carry more
#   parts (or start another runner: quality suites of two models share the GPU well; never time `speed`
#   beside another runner). Its output goes to $RES/logs/runner-NAME.log.
# --wait S: before packing the archive, wait up to S seconds for the running runners to end (a call that
#   only waits keeps the machine held); prints each runner's state.
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
#   graphs:MODEL              the CUDA-graph checks: the GPU tests of tests/test_graphs.py and
#                             scripts/studies/graph_capture_check.py on the model's committed H200 config in both
#                             Q/K/V layouts -> $RES/tests/graph-capture-MODEL-<layout>-<gpu>.json
# Lengths: ppl 8K/16K/32K, the others 4K-32K, within the model's context (smollm2: 8K).
# Environment: METHODS (main variant's methods), PPL_WINDOWS (perplexity windows per length, 4; the
# pydoc text holds only 3 windows of 32K Qwen tokens), RULER_PER_TASK (items per RULER task and length, 10),
# RULER_GEN (cap on generated tokens, 64), SUITE_LIMIT (seconds per suite step, 590), CALIB_LEN (calibration window, 8192), COST (cost model; default
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
deadline=100000 hard_end=100000 background="" wait_s=0
while [ $# -gt 0 ]; do
    case "$1" in
        --deadline) deadline=$2; shift 2 ;;
        --end) hard_end=$2; shift 2 ;;
        --background) background=$2; shift 2 ;;
        --wait) wait_s=$2; shift 2 ;;
        *) break ;;
    esac
done
RUNNERS=$CACHE/runners; mkdir -p "$RUNNERS"
export RUNNERS_DIR=$RUNNERS

# wheels and bundle parts carried by this call (carried folders stay on a warm machine: a stamp per
# wheel folder and per part keeps later calls from installing or hashing them again)
STAMPS=$CACHE/staged; mkdir -p "$STAMPS"
if [ -z "${SPARGE_RUNNER:-}" ]; then
    for w in .bundle-calib/wheels .bundle-lmeval/wheels; do
        [ -d "$w" ] || continue
        stamp="$STAMPS/wheels-$(basename "$(dirname "$w")")-$(ls "$w" | md5sum | cut -c1-12)"
        [ -f "$stamp" ] && continue
        python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" --upgrade "$w"/*.whl \
            > "$LOGS/wheels-$(basename "$(dirname "$w")").log" 2>&1
        rc=$?; echo "wheels $w: rc=$rc"; [ $rc -eq 0 ] && touch "$stamp"
    done
    for part in .bundle-*/part-*; do
        [ -f "$part/BUNDLE.txt" ] || continue
        stamp="$STAMPS/$(grep -m1 '^bundle_id=' "$part/BUNDLE.txt" | cut -d= -f2)-$(basename "$part")"
        [ -f "$stamp" ] && continue
        bash scripts/offline_install.sh --target "$SITE" "$part" >> "$LOGS/bundle.log" 2>&1
        rc=$?; echo "bundle $part: rc=$rc ($(tail -n 1 "$LOGS/bundle.log"))"; [ $rc -eq 0 ] && touch "$stamp"
    done
fi

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }  # PIDFILE: its process still runs
report() {  # each runner: running or its exit status, and its log's last lines
    local f name
    for f in "$RUNNERS"/*.pid; do
        [ -f "$f" ] || continue
        name=$(basename "$f" .pid)
        if alive "$f"; then echo "runner $name: running"
        else echo "runner $name: ended rc=$(cat "$RUNNERS/$name.rc" 2>/dev/null || echo '?')"; fi
        grep -E '^(== |rc=|skipped)' "$LOGS/runner-$name.log" 2>/dev/null | tail -n 4
    done
}
pack() { tar czf "$OUT/paper-results.tgz" -C "$CACHE" paper-results && ls -la "$OUT"; }
running() { local f; for f in "$RUNNERS"/*.pid; do alive "$f" && return 0; done; return 1; }

if [ -n "$background" ] && [ -z "${SPARGE_RUNNER:-}" ]; then
    alive "$RUNNERS/$background.pid" && { echo "runner $background is already running" >&2; exit 2; }
    rm -f "$RUNNERS/$background.rc"
    SPARGE_RUNNER=$background setsid bash -c \
        'bash "$0" --deadline "$1" --end "$2" "${@:3}"; echo $? > "$RUNNERS_DIR/$SPARGE_RUNNER.rc"' \
        "$0" "$deadline" "$hard_end" "$@" > "$LOGS/runner-$background.log" 2>&1 < /dev/null &
    echo $! > "$RUNNERS/$background.pid"
    echo "runner $background started (pid $(cat "$RUNNERS/$background.pid")): $*"
    set --  # the steps are the runner's
fi

DEVICE=${DEVICE:-cuda}
gpu=$(python3 -c 'from evals.environment import gpu_slug; print(gpu_slug())')
context() { case "$1" in smollm2) echo 8192 ;; *) echo 32768 ;; esac; }
lengths() { local ctx; ctx=$(context "$1"); shift; for L in "$@"; do [ "$L" -le "$ctx" ] && printf '%s ' "$L"; done; }
METHODS=${METHODS:-dense sparge sparge-topk minference flexprefill sparge-budget}
step() {  # NAME LIMIT CMD...: run with a time limit, log to $LOGS/NAME[-RUNNER].log, print rc and the log's tail
    local name=$1${SPARGE_RUNNER:+-$SPARGE_RUNNER} limit=$2; shift 2  # two runners may run one suite
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
    local m=$1; local cost=${COST:-results/kernel/$gpu-cost-$m-shape.json} cost_arg=()
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
    local tmp="runs/out-${SPARGE_RUNNER:-call}-$group-$s"  # per runner: two runners may run one suite
    rm -rf "$tmp"
    step "suite-$s-$group" "${SUITE_LIMIT:-590}" python3 -m evals "$s" --model "$m" --config "$config" --capture "runs/$m.capture" \
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
        graphs) mkdir -p "$RES/tests"
                step "pytest-graphs" 300 python3 -m pytest -q -m gpu tests/test_graphs.py
                for layout in hf contiguous; do
                    step "graph-capture-$a-$layout" 200 python3 scripts/studies/graph_capture_check.py \
                        --config "results/calibration/$a-$gpu.json" --layout "$layout" \
                        --out "$RES/tests/graph-capture-$a-$layout-$gpu.json"
                done ;;
        *) echo "unknown step $spec" >&2 ;;
    esac
done
[ -n "${SPARGE_RUNNER:-}" ] && exit 0  # a runner's results are in $RES; the calls pack them
t_wait=$SECONDS
while [ $((SECONDS - t_wait)) -lt "$wait_s" ] && running; do sleep 5; done
report
pack
