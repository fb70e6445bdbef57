# The README's two commands: `make pretrain` and `make test`. Each installs what it needs first.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
CONFIG ?= configs/based_tiny.yaml
NODES ?=
GPUS_PER_NODE ?=
ARGS ?=
TINY_DATA ?= data/tiny
PYTEST_ARGS ?=
DEVICE ?= H100
TOKENS_PER_S ?=
RUNS ?=
REPORT_OUT ?= reports/latest
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: setup test test-slow test-gpu test-all pretrain tiny-data describe report lint format clean

# A venv with the project installed (editable) and every extra. On a machine without an NVIDIA GPU,
# torch is pinned to the local CPU build (constraints-cpu.txt); with a GPU, the machine's torch is reused.
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
ifeq ($(HAS_GPU),1)
	$(PY) -m venv --system-site-packages $(VENV)
	$(PYTHON) -m pip install -q -e '.[all]'
else
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q -c constraints-cpu.txt -e '.[all]'
endif
	touch $@

# Everything a CPU can run: unit tests, kernels under the Triton interpreter, multi-process gloo tests.
test: setup
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -m "not gpu and not slow" -q $(PYTEST_ARGS) tests

test-slow: setup
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -m "slow and not gpu" -q $(PYTEST_ARGS) tests

test-gpu: setup
	$(PYTHON) -m pytest -m gpu -q $(PYTEST_ARGS) tests

# The deterministic generated corpus and its tokenizer that the tiny configs train on.
tiny-data: setup
	@test -f $(TINY_DATA)/manifest.json || $(PYTHON) -m data_pipeline.tiny_corpus --out $(TINY_DATA) --seq-len 128

# make pretrain [CONFIG=configs/x.yaml] [NODES=n (default: the config's launch.nodes)] [GPUS_PER_NODE=g] [ARGS="key=value ..."]
pretrain: setup
	@if [ "$(CONFIG)" = "configs/based_tiny.yaml" ] || grep -q "path: $(TINY_DATA)$$" "$(CONFIG)" 2>/dev/null; then \
		$(MAKE) --no-print-directory tiny-data; fi
	$(PYTHON) -m launch.pretrain --config "$(CONFIG)" $(if $(NODES),--nodes $(NODES)) $(if $(GPUS_PER_NODE),--gpus-per-node $(GPUS_PER_NODE)) -- $(ARGS)

# make describe CONFIG=configs/x.yaml [NODES=n] [GPUS_PER_NODE=g] [DEVICE=H100|H200] [TOKENS_PER_S=per-GPU rate]
describe: setup
	$(PYTHON) -m pretrain.describe $(CONFIG) $(if $(NODES),--nodes $(NODES)) $(if $(GPUS_PER_NODE),--gpus-per-node $(GPUS_PER_NODE)) \
		--device "$(DEVICE)" $(if $(TOKENS_PER_S),--tokens-per-s $(TOKENS_PER_S))

# make report RUNS="runs/a runs/b ..." [REPORT_OUT=reports/latest]: report.md and figures (tools/report.py)
report: setup
	@test -n "$(RUNS)" || { echo 'make report: give the run folders, e.g. make report RUNS="runs/based_360m_10b runs/attn_360m_10b"' >&2; exit 2; }
	$(PYTHON) tools/report.py $(RUNS) --out "$(REPORT_OUT)"

lint: setup
	$(PYTHON) -m ruff check .

format: setup
	$(PYTHON) -m ruff format .

clean:
	rm -rf $(VENV) .pytest_cache
