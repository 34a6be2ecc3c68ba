#!/usr/bin/env bash
# Install fastcontrast into fresh virtual environments (never editable) the way the README says, and test it
# from outside the source tree. Usage: tests/packaging/run_smokes.sh {wheel|sdist|checkout|extras|triton-min|all}...
#
#   wheel       what `make dist` built, with the README's command (`pip install dist/fastcontrast-*.whl`):
#               the wheel alone (torch and reference backends, `check`, `info`), then with [triton]
#               (`pip install "dist/fastcontrast-<version>-py3-none-any.whl[triton]"`): a loss and one kernel in
#               triton's interpreter, a sample compile (tests/packaging/smoke.py)
#   sdist       the same, installed from the sdist (pip builds it: a file missing from MANIFEST.in fails),
#               less the sample compile, which compiles the same installed files as the wheel's (--quick)
#   checkout    the README's other route, `pip install .` and `pip install ".[triton]"` in a copy of the
#               checkout (its tracked and untracked files, less .git, virtual environments and build output):
#               the package without triton (smoke.py --quick: `check` is the wheel's job), then [triton]
#               installed and importable. Needs no `make dist`; the interpreter runs are the wheel's and sdist's.
#   extras      [bench], [release], [test], [dev] from the wheel: every requirement installed and importable
#               (check_extra.py), then what the extra is for: [bench] a tiny `bench --plot`, [test] the
#               sdist's test suite collects, [dev] ruff, [release] build and twine
#   triton-min  the lower bound triton>=3.2: [test] with $TRITON_MIN_SPEC, then the sdist's test suite
#               (-m interpreter: every kernel in triton's interpreter against the references)
#
# Every venv gets $TORCH_SPEC first and installs under a constraints file that pins torch and triton, so that
# pip never resolves an unpinned torch (a multi-GB CUDA build) nor drifts to a new triton. pip's cache is
# shared by all of them. Environment: PYTHON, TORCH_SPEC, TRITON_SPEC, TRITON_MIN_SPEC, DIST, SMOKE_DIR,
# SMOKE_PYTEST_ARGS (the Makefile passes its own values but the last).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TRITON_SPEC="${TRITON_SPEC:-triton==3.9.0}"
TRITON_MIN_SPEC="${TRITON_MIN_SPEC:-triton==3.2.0}"
SMOKE_DIR="${SMOKE_DIR:-${TMPDIR:-/tmp}/fastcontrast-smoke}"
# Markers rather than file names, so that the selection survives the test suite's reorganisations.
read -r -a PYTEST_ARGS <<< "${SMOKE_PYTEST_ARGS:--m interpreter}"

[ "$#" -gt 0 ] || set -- all
# Every target but `checkout` installs what `make dist` built.
NEEDS_DIST=0
for target in "$@"; do [ "$target" = checkout ] || NEEDS_DIST=1; done
# The sdist is installed by URL with the file's hash: pip caches the wheel it builds from an sdist under the
# sdist's URL, so a rebuilt sdist at the same path would otherwise install the previous build's wheel from
# that cache. The wheel is installed by its path, as the README says (pip builds nothing from it).
url_of() { echo "file://$1#sha256=$(sha256sum "$1" | cut -d' ' -f1)"; }
if [ "$NEEDS_DIST" = 1 ]; then
    DIST="$(cd "${DIST:-$ROOT/dist}" && pwd)"
    shopt -s nullglob
    wheels=("$DIST"/fastcontrast-*.whl)
    sdists=("$DIST"/fastcontrast-*.tar.gz)
    shopt -u nullglob
    if [ "${#wheels[@]}" -ne 1 ] || [ "${#sdists[@]}" -ne 1 ]; then
        echo "run_smokes: expected one wheel and one sdist in $DIST (run \`make dist\` first)" >&2
        exit 1
    fi
    WHEEL="${wheels[0]}"
    SDIST="${sdists[0]}"
fi
case "$SMOKE_DIR" in "$ROOT"|"$ROOT"/*) echo "run_smokes: SMOKE_DIR must be outside the checkout" >&2; exit 1;; esac
mkdir -p "$SMOKE_DIR"
rm -rf "$SMOKE_DIR/sdist-src"

log() { printf '[run_smokes] %s\n' "$*"; }

# pip install, without the machine's pip-config noise ("Location … is ignored") on success.
pip_install() {
    local venv="$1"; shift
    local err="$SMOKE_DIR/pip-stderr.txt"
    if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" 2> "$err"; then
        grep -v "is ignored: it is neither a file nor a directory" "$err" >&2 || true
        return 1
    fi
    grep -v "is ignored: it is neither a file nor a directory" "$err" >&2 || true
}

# new_venv NAME CONSTRAINTS: a fresh venv with torch only; prints its path's name in the log.
new_venv() {
    local venv="$SMOKE_DIR/$1" constraints="$2"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    pip_install "$venv" -c "$constraints" "$TORCH_SPEC"
    log "$1: fresh venv, $("$venv/bin/python" -W ignore -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}")')"
}

# An empty working folder outside the checkout, holding only copies of the smoke scripts.
scratch() {
    local dir="$SMOKE_DIR/$1-cwd"
    rm -rf "$dir"
    mkdir -p "$dir"
    cp "$HERE/smoke.py" "$HERE/check_extra.py" "$dir/"
    echo "$dir"
}

constraints() {  # constraints NAME LINE...
    local file="$SMOKE_DIR/$1-constraints.txt"
    shift
    printf '%s\n' "$@" > "$file"
    echo "$file"
}

# The sdist's own tests/ (and its pyproject.toml, for the pytest settings), unpacked outside the checkout,
# once per run of this script (sdist-src is cleared at its start).
sdist_tests() {
    local dir="$SMOKE_DIR/sdist-src"
    if [ ! -d "$dir/tests" ]; then
        rm -rf "$dir" "$SMOKE_DIR/sdist-unpack"
        mkdir -p "$SMOKE_DIR/sdist-unpack" "$dir"
        tar -xzf "$SDIST" -C "$SMOKE_DIR/sdist-unpack"
        cp -r "$SMOKE_DIR"/sdist-unpack/*/tests "$SMOKE_DIR"/sdist-unpack/*/pyproject.toml "$dir/"
        rm -rf "$SMOKE_DIR/sdist-unpack"
    fi
    echo "$dir"
}

# run_pytest VENV [ARGS]: the sdist's test suite (ARGS, else PYTEST_ARGS) against the installed package.
run_pytest() {
    local venv="$1" dir
    shift
    [ "$#" -gt 0 ] || set -- "${PYTEST_ARGS[@]}"
    dir="$(sdist_tests)"
    # `pytest` (not `python -m pytest`) so that the working folder is not put on sys.path; the folder has no
    # fastcontrast/ anyway, so the package can only come from the venv.
    (cd "$dir" && "$venv/bin/pytest" -q -p no:cacheprovider "$@" tests)
}

# requirement_of wheel|sdist PATH [EXTRA]: what pip is given, the wheel's path as the README writes it.
requirement_of() {
    if [ "$1" = wheel ]; then
        echo "$2${3:+[$3]}"
    else
        echo "fastcontrast${3:+[$3]} @ $(url_of "$2")"
    fi
}

smoke_artifact() {  # smoke_artifact wheel|sdist PATH [smoke.py options]
    local kind="$1" artifact="$2" venv="$SMOKE_DIR/$1" cons cwd
    shift 2
    local start=$SECONDS
    cons="$(constraints "$kind" "$TORCH_SPEC" "$TRITON_SPEC")"
    new_venv "$kind" "$cons"
    pip_install "$venv" -c "$cons" "$(requirement_of "$kind" "$artifact")"
    "$venv/bin/python" -m pip check
    cwd="$(scratch "$kind")"
    log "$kind: $(basename "$artifact") without triton"
    (cd "$cwd" && "$venv/bin/python" smoke.py --triton absent)
    pip_install "$venv" -c "$cons" "$(requirement_of "$kind" "$artifact" triton)"
    (cd "$cwd" && "$venv/bin/python" check_extra.py triton)
    # triton's interpreter (TRITON_INTERPRET=1, the only way to run the kernels on a CPU) imports numpy,
    # which triton does not declare; [test] and [dev] bring it, [triton] (for GPUs) does not.
    pip_install "$venv" -c "$cons" numpy
    log "$kind: $(basename "$artifact") with $("$venv/bin/python" -c 'import triton; print("triton", triton.__version__)') (interpreter)"
    (cd "$cwd" && "$venv/bin/python" smoke.py --triton present "$@")
    log "$kind: passed in $((SECONDS - start)) s"
}

# install_extra VENV EXTRA [check_extra.py options]: fastcontrast[EXTRA] from the wheel into VENV, then
# `pip check` and check_extra.py.
install_extra() {
    local venv="$1" extra="$2" cwd
    shift 2
    pip_install "$venv" -c "$EXTRAS_CONS" "$WHEEL[$extra]"
    "$venv/bin/python" -m pip check
    cwd="$(scratch "extra-$extra")"
    (cd "$cwd" && "$venv/bin/python" check_extra.py "$extra" "$@")
}

# [bench] and [test] each go into a fresh venv, so that nothing another extra brings can hide a requirement
# they lack ([test] lacked numpy). [release] then goes on top of [bench] (neither needs what the other brings),
# and [dev] on top of [test], after check_extra.py has checked that [dev] declares all of [test] and [bench].
smoke_extras() {
    local venv start=$SECONDS
    EXTRAS_CONS="$(constraints extras "$TORCH_SPEC" "$TRITON_SPEC")"

    venv="$SMOKE_DIR/extras-bench"
    new_venv extras-bench "$EXTRAS_CONS"
    install_extra "$venv" bench
    # Sizes whose measured peak memory is never 0: with every value 0, --plot's log axis fails.
    (cd "$(scratch extra-bench)" && "$venv/bin/python" -m fastcontrast bench --loss clip --n 256 512 --d 32 \
        --repeats 1 --no-search --json bench.json --plot bench.png --quiet > bench.txt \
        && test -s bench.json && test -s bench.png)
    log "extras: [bench] python -m fastcontrast bench --json --plot: ok"
    install_extra "$venv" release
    "$venv/bin/python" -m build --version
    "$venv/bin/twine" --version
    log "extras: [bench], [release] passed in $((SECONDS - start)) s"

    start=$SECONDS
    venv="$SMOKE_DIR/extras-test"
    new_venv extras-test "$EXTRAS_CONS"
    install_extra "$venv" test --interpreter  # the test suite runs the kernels in triton's interpreter
    run_pytest "$venv" --collect-only -qq  # every test module imports; triton-min runs the interpreter tests
    install_extra "$venv" dev --interpreter --includes test bench
    "$venv/bin/ruff" --version
    log "extras: [test], [dev] passed in $((SECONDS - start)) s"
}

# The README's install from a checkout, in a copy of it: `pip install .` would otherwise build in the checkout
# itself (setuptools writes build/ and *.egg-info there, and a stale build/lib can leak old files into the
# wheel). The copy is what a fresh clone holds plus untracked files not yet committed.
smoke_checkout() {
    local venv="$SMOKE_DIR/checkout" src="$SMOKE_DIR/checkout-src" cons cwd start=$SECONDS
    rm -rf "$src"
    mkdir -p "$src"
    tar -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./venv --exclude=./build --exclude=./dist \
        --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache --exclude=.hypothesis \
        --exclude=.benchmarks --exclude=.ruff_cache -cf - . | tar -C "$src" -xf -
    cons="$(constraints checkout "$TORCH_SPEC" "$TRITON_SPEC")"
    new_venv checkout "$cons"
    (cd "$src" && pip_install "$venv" -c "$cons" .)
    "$venv/bin/python" -m pip check
    cwd="$(scratch checkout)"
    log "checkout: pip install . without triton"
    (cd "$cwd" && "$venv/bin/python" smoke.py --triton absent --quick)
    (cd "$src" && pip_install "$venv" -c "$cons" ".[triton]")
    (cd "$cwd" && "$venv/bin/python" check_extra.py triton)
    log "checkout: pip install \".[triton]\": triton $("$venv/bin/python" -c 'import triton; print(triton.__version__)')"
    rm -rf "$src"
    log "checkout: passed in $((SECONDS - start)) s"
}

smoke_triton_min() {
    local venv="$SMOKE_DIR/triton-min" cons cwd start=$SECONDS
    # triton < 3.7's interpreter turns 1-element arrays into ints, which numpy 2.4 refuses ("only
    # 0-dimensional arrays can be converted to Python scalars"): it needs numpy < 2.4. Only the interpreter
    # (CPU) is affected; on a GPU triton does not use numpy.
    cons="$(constraints triton-min "$TORCH_SPEC" "$TRITON_MIN_SPEC" "numpy<2.4")"
    new_venv triton-min "$cons"
    pip_install "$venv" -c "$cons" "$WHEEL[test]"
    "$venv/bin/python" -m pip check
    cwd="$(scratch triton-min)"
    (cd "$cwd" && "$venv/bin/python" check_extra.py test --interpreter)
    log "triton-min: the sdist's tests ${PYTEST_ARGS[*]} with $("$venv/bin/python" -c 'import triton, numpy; print(f"triton {triton.__version__}, numpy {numpy.__version__}")')"
    run_pytest "$venv"
    log "triton-min: passed in $((SECONDS - start)) s"
}

for target in "$@"; do
    case "$target" in
        wheel) smoke_artifact wheel "$WHEEL";;
        sdist) smoke_artifact sdist "$SDIST" --quick;;
        checkout) smoke_checkout;;
        extras) smoke_extras;;
        triton-min) smoke_triton_min;;
        all) smoke_artifact wheel "$WHEEL"; smoke_artifact sdist "$SDIST" --quick; smoke_checkout; smoke_extras
             smoke_triton_min;;
        *) echo "run_smokes: unknown target $target (wheel, sdist, checkout, extras, triton-min, all)" >&2; exit 2;;
    esac
done
