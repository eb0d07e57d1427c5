#!/usr/bin/env bash
# The H100 text session, step 2 (step 1: `bash scripts/offline_install.sh .bundle/part-001` in a first
# call; this call carries .bundle/part-002). Calibrates SmolLM2 at the paper's setting, measures the
# search against the exhaustive tuner procedure, the quantized kernel on real Q/K/V, the rivals at
# matched density, perplexity and prefill latency. Everything lands in $OUT/llm.tgz (logs included).
set -uo pipefail
OUT=${OUT:-/tmp/out}
bash scripts/offline_install.sh .bundle/part-002 || exit 1
export PYTHONPATH=$HOME/.cache/sparge/site-packages:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
R=$OUT/llm; mkdir -p runs "$R"
step() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" > "$R/$name.log" 2>&1; echo "rc=$?"; tail -n 12 "$R/$name.log"; }
step calibrate 300 python3 -m calibrate --model smollm2 --samples 5 --holdout 1 --seq-len 8192 --device cuda --out runs/smollm2.json --quiet
cp runs/smollm2.json runs/smollm2.png runs/smollm2.capture/timing.json "$R/" 2>/dev/null
step quality 150 python3 scripts/search_quality.py --capture runs/smollm2.capture --layers 0 5 10 15 20 25 29 --out "$R/search-quality.json"
step quant 60 python3 scripts/quant_accuracy_real.py --capture runs/smollm2.capture --out "$R/accuracy-real.csv"
step rivals 150 python3 scripts/rivals_l1_table.py --capture runs/smollm2.capture --samples 2 --out "$R/rivals_l1"
step ppl 60 python3 scripts/ppl_smollm2.py --device cuda --length 2048 --count 8 --out "$R/h100-pydoc-2k.json"
step latency 90 python3 scripts/latency_smollm2.py --lengths 2048 4096 8192 --out "$R/h100-prefill.json"
tar czf "$OUT/llm.tgz" -C "$OUT" llm && rm -rf "$R"
