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
	$(PY) -m pip install -q --no-deps -r tests/integrations/requirements.txt
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(PY) -m ruff check .

# The second line is a smoke run of the benchmark suite at its smallest sizes (seconds), so it cannot rot.
test: lint
	$(PY) -m pytest -q
	FASTCONTRAST_BENCH=smoke $(PY) -m pytest benchmarks -q --benchmark-disable

# Under two minutes on a 2-core CPU: CLIP forward+backward at N = 1024 … 8192, then the largest N each provider
# fits in 2 GiB (the naive loss runs out of memory; the blockwise engine is stopped by the time limit).
BENCH_ARGS ?= --loss clip --n 1024 2048 4096 8192 --d 256 --dtype fp32 --repeats 3 --memory-budget 2GiB --time-limit 30

bench: setup
	$(PY) -m fastcontrast bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
