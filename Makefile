# `make demo` and `make test` install what they need into .venv/ themselves.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
WORKDIR ?= runs

.PHONY: install test lint demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check gns experiments configs tests
	$(VENV)/bin/ruff format --check gns experiments configs tests

demo: install
	$(PY) -m experiments.cifar10 --config configs/cifar10.py:cpu --config.mode=compare \
	  --config.data.source=folder --config.data.path=$(or $(DATA),../shared/data/cifar10-jpeg.tar.gz) \
	  --workdir $(WORKDIR)/demo

bench: install
	$(PY) -m experiments.bench --config configs/bench.py --workdir $(WORKDIR)/bench

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache
