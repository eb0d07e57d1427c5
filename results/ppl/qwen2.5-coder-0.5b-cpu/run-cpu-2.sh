cd /work/main
export PYTHONPATH=$HOME/.cache/sparge/site-packages:$PWD
while pgrep -f "qwen-cpu.sh" > /dev/null; do sleep 10; done
echo "capture start $(date +%T)"
.venv/bin/python -c "
from calibrate.capture import capture_to_disk
from calibrate.models import load_model
m, tok = load_model('qwen2.5-coder-0.5b', device='cpu')
capture_to_disk(m, tok, 'runs/qwen-cpu.capture', corpus='pydoc', seq_len=8192, samples=1, seed=0, model_name='qwen2.5-coder-0.5b')
"
echo "capture rc=$? $(date +%T)"
.venv/bin/python -m evals ppl --model qwen2.5-coder-0.5b --config runs/qwen2.5-coder-0.5b-h200.json --capture runs/qwen-cpu.capture --density matched --methods minference flexprefill --lengths 8192 --windows 2 --device cpu --out runs/qwen-cpu-rivals
echo "rivals rc=$? $(date +%T)"
