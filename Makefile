# qlaunch — the two commands:  make demo   |   make test
# Each creates .venv and installs what it needs first (CPU build of torch 2.13.0 where there is no CUDA).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch is installed before the package so pip never swaps in a multi-GB CUDA build on a CPU machine.
# Off this image, a CPU-only machine may need e.g. TORCH_PIP_ARGS="--index-url <PyTorch's CPU wheel index>".
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
DEMO_DIR ?= runs/demo
# One OpenMP thread per process: oversubscribed OpenMP on small CPUs slows training many times over.
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/qlaunch/torch_extensions
PYTEST_ARGS ?=

.PHONY: demo test test-unit test-integration bench install clean help

help:
	@echo "make demo   - install, build the tiny demo model, Q-LoRA fine-tune it (NF4), evaluate before/after"
	@echo "make test   - install everything for CPU tests (.[all]) and run the whole test suite"
	@echo "make bench  - benchmarks (print a table, write bench/results/*.json)"

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	@touch $@

$(VENV)/.demo: $(VENV)/.torch pyproject.toml
	$(PIP) install --quiet -e ".[bnb]"
	@touch $@

$(VENV)/.all: $(VENV)/.torch pyproject.toml
	$(PIP) install --quiet -e ".[all]"
	@touch $@ $(VENV)/.demo

install: $(VENV)/.all

demo: $(VENV)/.demo
	$(PY) -m qlaunch.demo --out $(DEMO_DIR)
	$(PY) -m qlaunch.evaluate --base $(DEMO_DIR)/model --data $(DEMO_DIR)/data/eval.json --json $(DEMO_DIR)/eval_before.json --show 2
	PYTHON=$(abspath $(PY)) bash launch/qlora_single_gpu.sh -c recipes/demo-qlora.yaml \
		-m $(DEMO_DIR)/model -d $(DEMO_DIR)/data/train.json -o $(DEMO_DIR)/adapter
	$(PY) -m qlaunch.evaluate --adapter $(DEMO_DIR)/adapter --data $(DEMO_DIR)/data/eval.json --json $(DEMO_DIR)/eval_after.json --show 3
	$(PY) -m qlaunch.evaluate --compare $(DEMO_DIR)/eval_before.json $(DEMO_DIR)/eval_after.json

test: $(VENV)/.all
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-unit: $(VENV)/.all
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: $(VENV)/.all
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

bench: $(VENV)/.all
	$(PY) bench/nf4_bits.py
	$(PY) bench/padding.py
	$(PY) bench/throughput.py
	$(PY) bench/tokenization.py
	$(PY) bench/logits_memory.py
	$(PY) bench/merge_memory.py

clean:
	rm -rf $(VENV) runs
