#!/usr/bin/env bash
# The GPU session of issues 14 and 18 (time-optimised calibration, several GPUs): one step per call,
# each under 10 minutes, each writing its outputs and a log under results/.
#
#   bash scripts/gpu_calib_session.sh profile        # results/kernel/<gpu>-cost.json (+ .log)
#   bash scripts/gpu_calib_session.sh smollm2        # SmolLM2: time- and sparsity-optimised configs
#   bash scripts/gpu_calib_session.sh speed          # evals speed of both configs at 8K
#   bash scripts/gpu_calib_session.sh compare        # predicted vs measured tables
#   bash scripts/gpu_calib_session.sh l8b-capture    # 8B shape, 5 (+1) x 32K, query subset: capture only
#   bash scripts/gpu_calib_session.sh l8b-search 1   # search on 1 GPU (2, 4: on an x2 / x4 machine)
#   bash scripts/gpu_calib_session.sh scaling        # growth of the pieces on the GPU
#   bash scripts/gpu_calib_session.sh tests          # the gpu-marked tests of these modules
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
slug=$($PY -c "import torch; from calibrate.cost import gpu_slug; print(gpu_slug(torch.cuda.get_device_name()))")
cal=results/calibration
mkdir -p "$cal" runs

case "${1:-}" in
  profile)
    $PY -m calibrate.profile --head-dims 64 --out runs/cost-64.json 2>&1 | tee "runs/profile-64.log"
    $PY -m calibrate.profile --head-dims 128 --out runs/cost-128.json 2>&1 | tee "runs/profile-128.log"
    $PY -m calibrate.profile --merge runs/cost-64.json runs/cost-128.json --out "results/kernel/$slug-cost.json"
    cat runs/profile-64.log runs/profile-128.log > "results/kernel/$slug-cost.log" ;;
  smollm2)
    # the same capture for both objectives; fresh storages
    $PY -m calibrate --model smollm2 --data pydoc --samples 5 --seq-len 8192 --device cuda --objective time \
        --estimator keys,pooled --cost-model "results/kernel/$slug-cost.json" --out "$cal/smollm2-time-$slug.json" \
        2>&1 | tee "$cal/smollm2-time-$slug.log"
    $PY -m calibrate --model smollm2 --data pydoc --samples 5 --seq-len 8192 --device cuda --objective sparsity \
        --cost-model "results/kernel/$slug-cost.json" --capture-dir "$cal/smollm2-time-$slug.capture" \
        --out "$cal/smollm2-sparsity-$slug.json" 2>&1 | tee "$cal/smollm2-sparsity-$slug.log" ;;
  speed)
    for obj in time sparsity; do
      $PY -m evals speed --model smollm2 --config "$cal/smollm2-$obj-$slug.json" --methods sparge --lengths 8192 \
          --device cuda --out "results/speed-$obj-$slug" 2>&1 | tee "$cal/smollm2-$obj-$slug-speed.log"
    done ;;
  compare)
    for obj in time sparsity; do
      $PY scripts/predicted_vs_measured.py --config "$cal/smollm2-$obj-$slug.json" \
          --speed "results/speed-$obj-$slug/speed/smollm2/sparge.json" \
          --out "$cal/smollm2-$obj-$slug-predicted-vs-measured.md"
    done ;;
  l8b-capture)
    # capture (and a first one-GPU search) of the 8B shape: 6 x 32K windows, 32 of 256 query blocks stored
    /usr/bin/time -v $PY -m calibrate --model llama8b-random --data pydoc --samples 5 --holdout 1 --seq-len 32768 \
        --query-blocks 32 --device cuda --objective time --cost-model "results/kernel/$slug-cost.json" \
        --out "runs/l8b-capture.json" 2>&1 | tee "$cal/llama8b-random-5x32k-capture-$slug.log"
    du -sb runs/l8b-capture.capture | tee -a "$cal/llama8b-random-5x32k-capture-$slug.log" ;;
  l8b-search)
    k=${2:?number of GPUs}
    devs=$($PY -c "print(','.join(f'cuda:{i}' for i in range($k)))")
    rm -f "runs/l8b-$k.optuna.db"
    /usr/bin/time -v $PY -m calibrate --model llama8b-random --data pydoc --samples 5 --holdout 1 --seq-len 32768 \
        --query-blocks 32 --device cuda --objective time --cost-model "results/kernel/$slug-cost.json" \
        --capture-dir runs/l8b-capture.capture --storage "sqlite:///$PWD/runs/l8b-$k.optuna.db" --devices "$devs" \
        --out "$cal/llama8b-random-5x32k-${slug}x$k.json" 2>&1 | tee "$cal/llama8b-random-5x32k-${slug}x$k.log" ;;
  scaling)
    $PY scripts/calibration_scaling.py --device cuda --repeats 1 --out "$cal/scaling-$slug" 2>&1 | tail -20 ;;
  tests)
    $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_cost.py tests/test_objective.py tests/test_config_v2.py \
        tests/test_query_subset.py tests/test_calibrate_workers.py ;;
  *) echo "usage: $0 profile|smollm2|speed|compare|l8b-capture|l8b-search K|scaling|tests" >&2; exit 2 ;;
esac
