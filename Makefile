# The README's two commands: `make test` and `make bench`. Both build the virtual environment first.
# TORCH_SPEC is pinned so that pip never resolves an unpinned torch (on CPU machines that would pull a
# multi-GB CUDA build); on a GPU box, override it with the build you want, e.g. TORCH_SPEC=torch==2.13.0.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: setup test lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q

bench: setup
	$(PY) -m fastcontrast bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
