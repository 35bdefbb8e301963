# The two commands the README names: `make demo` (main job on the embedded default data) and `make test`.
# Each does all set-up on a fresh machine: a virtualenv with the CPU build of torch pinned first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench report gpu-check
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/gmaivl-rt demo --out runs/demo

test: setup
	$(BIN)/python -m pytest -q -ra

bench: setup
	$(BIN)/python -m pytest bench -q --benchmark-columns=min,mean,rounds

report: setup
	$(BIN)/gmaivl-rt kernels report --json runs/kernel_report.json

# One-shot check on a lent GPU (see README "Kernels"): results appended to runs/gpu_check/gpu_check.jsonl as they come.
GPU_CHECK_BUDGET ?= 420
gpu-check: setup
	$(BIN)/python -m gmaivl_rt.gpu_check --out runs/gpu_check --budget $(GPU_CHECK_BUDGET)
