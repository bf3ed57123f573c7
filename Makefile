# Two entry points, each self-installing into .venv: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
JOBS   ?= 2
export HYPOTHESIS_PROFILE ?= ci

.PHONY: demo test test-slow lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m apps.resrep demo

test: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) --dist loadgroup

test-slow: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) --dist loadgroup -m slow || [ $$? -eq 5 ]

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/ops.py
	$(PY) benchmarks/graph.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
