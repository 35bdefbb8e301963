# The two commands the README names: `make demo` (main job on the embedded default data) and `make test`.
# Each does all set-up on a fresh machine: a virtualenv with the CPU build of torch pinned first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# PyPI's Linux torch is the CUDA build (GBs of CUDA libraries). Without an NVIDIA GPU we take the CPU build from
# PyTorch's CPU wheel index, unless pip is configured with its own index or wheel folder (a mirror, a local
# torch+cpu wheel): then pip's configuration decides. `make setup TORCH_INDEX=URL` (or TORCH_INDEX=) overrides.
PIP_HAS_SOURCES := $(shell $(PYTHON) -m pip config list 2>/dev/null | grep -E 'index-url|find-links')
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
TORCH_INDEX ?= $(if $(or $(HAS_GPU),$(PIP_HAS_SOURCES)),,https://download.pytorch.org/whl/cpu)

.PHONY: setup demo test lint bench report fuzz mutate gpu-check
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/gmaivl-rt demo --out runs/demo

# Two pytest workers (pytest-xdist): the suite waits on servers, archives, browsers and child processes for much of
# its time, so two workers on 2 cores took 13.4 minutes where one took 22.5 (2026-12-07). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: setup browser archive js lint
	$(BIN)/python -m pytest -q -ra --durations=25 -n $(TEST_WORKERS)

# The house plan (pyproject's [tool.importlinter]): folders are layers, imports only go down, no cycles.
lint: setup
	$(BIN)/lint-imports --no-cache

bench: setup
	$(BIN)/python -m pytest bench -q --benchmark-columns=min,mean,rounds

report: setup
	$(BIN)/gmaivl-rt kernels report --json runs/kernel_report.json

# One-shot check on a lent GPU (see README "Kernels"): results appended to runs/gpu_check/gpu_check.jsonl as they come.
GPU_CHECK_BUDGET ?= 420
gpu-check: setup
	$(BIN)/python -m gmaivl_rt.gpu_check --out runs/gpu_check --budget $(GPU_CHECK_BUDGET)

# A longer fuzz of the image readers than CI's 200 examples per format, with shrinking; findings are saved under
# the pytest tmp folder's work/findings/ (keep them in tests/medical/fuzz_regressions/ once fixed). FUZZ_EXAMPLES to size it.
fuzz: setup
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-5000} FUZZ_SHRINK=1 FUZZ_RANDOM=1 $(BIN)/python -m pytest tests/medical/test_fuzz_readers.py -q -s

# A bounded soak of `gmaivl-rt serve` (not CI): mixed requests at a steady rate for SOAK_MINUTES (default 20) on a
# free loopback port; fails on any 5xx, a request missing from /metrics, RSS growth of 5% or more after the warm-up, or
# an RSS trend rising 0.25% a minute over the last 15 minutes (bench/soak_server.py).
.PHONY: soak
soak: setup
	SOAK_MINUTES=$${SOAK_MINUTES:-20} $(BIN)/python bench/soak_server.py

# The server's browser test drives Debian's chromium + chromedriver. Installed once, only where they are missing
# and we are root on an apt machine (CI); elsewhere the test skips and says why.
.PHONY: browser
browser:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver) \
		|| echo "chromium could not be installed: the browser test will skip"; fi

# The DICOMweb tests run a real archive: Debian's Orthanc with its DICOMweb plugin (and dicom3tools' dciodvfy to
# validate the reports). Installed like chromium: only where missing, as root on an apt machine; elsewhere they skip.
.PHONY: archive
archive:
	@if [ ! -x /usr/sbin/Orthanc ] || [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || \
		[ ! -x /usr/bin/dciodvfy ]; then \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q orthanc orthanc-dicomweb \
			dicom3tools) || echo "orthanc could not be installed: the DICOMweb tests will skip"; \
		else echo "orthanc not installed and apt not available: the DICOMweb tests will skip"; fi; fi

# Mutation testing (not CI: hours): cosmic-ray over mutation/*.toml; TARGETS= and MUTATE_TIMEOUT= narrow it.
mutate: setup
	$(BIN)/pip install -q -e '.[mutate]'
	PATH="$(abspath $(BIN)):$$PATH" mutation/run.sh

# transformers.js + onnxruntime-node for the export's Node test (tests/export/test_transformers_js.py): `npm ci` from
# js/package-lock.json into js/node_modules (kept between runs, redone when the lock file changes). Where npm is
# missing the test skips and says why.
.PHONY: js
js:
	@if command -v npm >/dev/null 2>&1; then \
		if [ ! -f js/node_modules/.installed ] || [ js/package-lock.json -nt js/node_modules/.installed ]; then \
			(cd js && npm ci --no-audit --no-fund) && touch js/node_modules/.installed \
			|| echo "npm ci failed in js/: the transformers.js tests will skip"; fi; \
	else echo "npm not found: the transformers.js tests will skip"; fi
