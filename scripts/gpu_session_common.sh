# Shared by the GPU session scripts (sourced, not run): the environment a device call needs and the
# helpers that log each step and pack a call's files into one archive under $OUT.
#   step NAME LIMIT_S CMD...  run CMD with a time limit, log to $DIR/NAME.log, print rc and the log's tail
#   header NAME               $DIR/env.txt: time, tree, GPU state, versions, whether FA4 imports
#   pack NAME                 copy runs/kernel/ into $DIR, pack $OUT/NAME/ into $OUT/NAME.tgz
# The caller sets DIR (the call's folder under $OUT) before using them.
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
SITE=${SITE:-$HOME/.cache/sparge/fa4-site}
# the FA4 install (scripts/stage_wheels.sh; cutlass sits in dsl_packages, which a .pth adds in a normal install)
export PYTHONPATH=$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages:$PWD
RUNS=runs/kernel
mkdir -p "$RUNS" "$OUT"
STEP_TAIL=${STEP_TAIL:-25}
step() {
    local name=$1 limit=$2; shift 2
    echo "== $name ($(date +%T), limit ${limit}s)"
    timeout "$limit" "$@" > "$DIR/$name.log" 2>&1
    echo "rc=$?"
    tail -n "$STEP_TAIL" "$DIR/$name.log"
}
pack() { cp -r "$RUNS"/. "$DIR/" 2>/dev/null; tar czf "$OUT/$1.tgz" -C "$OUT" "$1" && rm -rf "${OUT:?}/$1"; ls -la "$OUT"; }
header() {
    { echo "# $(date -u +%FT%TZ) call $1, tree $(cat .tree-commit 2>/dev/null || git rev-parse --short HEAD 2>/dev/null)"
      nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
      python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)'
      python3 -c 'import flash_attn.cute, cutlass; print("fa4 importable")' 2>&1 | tail -1; } > "$DIR/env.txt"
    cat "$DIR/env.txt"
}
