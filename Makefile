# The README's two commands: `make test` and `make bench`. Both build the virtual environment first.
# TORCH_SPEC is pinned so that pip never resolves an unpinned torch (on CPU machines that would pull a
# multi-GB CUDA build); on a GPU box, override it with the build you want, e.g. TORCH_SPEC=torch==2.13.0.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# triton is pinned too, so that CI results do not drift with each triton release. On a GPU box whose torch
# build requires its own triton, pass that one (e.g. TRITON_SPEC=triton to keep what torch brought).
TRITON_SPEC ?= triton==3.9.0
# The lower bound the package claims (triton>=3.2), checked by `make smoke-triton-min`.
TRITON_MIN_SPEC ?= triton==3.2.0
PY := $(VENV)/bin/python
DIST ?= dist
# The smokes' fresh virtual environments live outside the checkout.
SMOKE_DIR ?= $(or $(TMPDIR),/tmp)/fastcontrast-smoke
SMOKE_ENV = PYTHON="$(PYTHON)" TORCH_SPEC="$(TORCH_SPEC)" TRITON_SPEC="$(TRITON_SPEC)" \
	TRITON_MIN_SPEC="$(TRITON_MIN_SPEC)" DIST="$(DIST)" SMOKE_DIR="$(SMOKE_DIR)"

.PHONY: setup test lint bench dist smoke smoke-wheel smoke-sdist smoke-checkout smoke-extras smoke-triton-min clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q "$(TRITON_SPEC)"
	$(PY) -m pip install -q -e ".[dev,release]"
	$(PY) -m pip install -q --no-deps -r tests/integrations/requirements.txt
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(PY) -m ruff check .

# The slowest tests are listed so that the suite's time stays visible in CI logs. The second line is a smoke
# run of the benchmark suite at its smallest sizes (seconds), so it cannot rot.
test: lint
	$(PY) -m pytest -q --durations=15
	FASTCONTRAST_BENCH=smoke $(PY) -m pytest benchmarks -q --benchmark-disable

# Under two minutes on a 2-core CPU: CLIP forward+backward at N = 1024 … 8192, then the largest N each provider
# fits in 2 GiB (the naive loss runs out of memory; the blockwise engine is stopped by the time limit).
BENCH_ARGS ?= --loss clip --n 1024 2048 4096 8192 --d 256 --dtype fp32 --repeats 3 --memory-budget 2GiB --time-limit 30

bench: setup
	$(PY) -m fastcontrast bench $(BENCH_ARGS)

# The sdist and the wheel, built by the standard `build` frontend (the wheel from the sdist), then checked:
# `twine check --strict`, no warning in the build log, and every file of fastcontrast/ and kernels/ in the
# wheel, of the packages, tests, benchmarks and docs in the sdist (tests/packaging/check_dist.py).
# PYTHONDONTWRITEBYTECODE is dropped for the build only: with it setuptools warns that it skips byte-compiling.
dist: setup
	rm -rf $(DIST) build *.egg-info
	mkdir -p $(DIST)
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m build --outdir $(DIST) . > $(DIST)/build.log 2>&1 \
		|| { cat $(DIST)/build.log; exit 1; }
	$(PY) -m twine check --strict $(DIST)/*.whl $(DIST)/*.tar.gz
	$(PY) tests/packaging/check_dist.py $(DIST) --build-log $(DIST)/build.log

# Install the built wheel and sdist (never editable), and the checkout with `pip install .`, into fresh virtual
# environments and test them from outside the checkout: see tests/packaging/run_smokes.sh. `make smoke` builds
# first; the single targets test what is already in $(DIST) (smoke-checkout needs no build).
smoke: dist
	$(SMOKE_ENV) bash tests/packaging/run_smokes.sh all

smoke-wheel smoke-sdist smoke-checkout smoke-extras smoke-triton-min:
	$(SMOKE_ENV) bash tests/packaging/run_smokes.sh $(@:smoke-%=%)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks $(DIST) $(SMOKE_DIR)
