cd /work/main
export PYTHONPATH=$HOME/.cache/sparge/site-packages:$PWD
for cfg in qwen2.5-coder-0.5b-h200 qwen2.5-coder-0.5b-local1-h200; do
  m="sparge"; [ $cfg = qwen2.5-coder-0.5b-h200 ] && m="dense sparge"
  .venv/bin/python -m evals ppl --model qwen2.5-coder-0.5b --config runs/$cfg.json --methods $m --lengths 8192 --windows 2 --device cpu --out runs/qwen-cpu-$cfg
  echo "done $cfg rc=$? $(date +%T)"
done
