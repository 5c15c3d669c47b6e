# `make demo` and `make test` install what they need into .venv/ themselves.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
WORKDIR ?= runs
# DATA: an image folder/.tar.gz (split/class/image.jpg) or cifar-10-binary.tar.gz. Default (the
# config's, configs/cifar10.py default_data): the shared JPEG archive when present, else
# CIFAR-10 downloaded once into ~/.cache/gns (MD5-checked).
DATA ?=
SOURCE = $(if $(findstring cifar-10-binary,$(DATA)),cifar10_binary,folder)
DATA_FLAGS = $(if $(DATA),--config.data.source=$(SOURCE) --config.data.path=$(DATA))

.PHONY: install test lint demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The suite in PYTEST_WORKERS processes, one test file each at a time (pytest-xdist), the
# longest files first (tests/conftest.py, LONGEST_FIRST).
PYTEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: install
	$(VENV)/bin/ruff check gns experiments configs tests docs/*.py
	$(VENV)/bin/ruff format --check gns experiments configs tests docs/*.py

# demo: every batch-size policy to the same smoothed target, 2 seeds (experiments/compare.py).
# DEMO_CONFIG/DEMO_FLAGS: another setup or overrides (the test runs the smoke setup).
DEMO_CONFIG ?= configs/cifar10.py:demo
DEMO_FLAGS ?=
demo: install
	$(PY) -m experiments.cifar10 --config $(DEMO_CONFIG) --config.mode=compare \
	  $(DATA_FLAGS) $(DEMO_FLAGS) --workdir $(WORKDIR)/demo

bench: install
	$(PY) -m experiments.bench --config configs/bench.py --workdir $(WORKDIR)/bench

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache
