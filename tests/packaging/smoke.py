"""Smoke test of an installed fastcontrast (a wheel, an sdist or a checkout, never editable), run from outside it.

    python smoke.py --triton absent    # the package alone: torch and reference backends
    python smoke.py --triton present   # with triton: its kernels in the interpreter too, and a sample compile

run_smokes.sh copies this file into an empty folder and runs it there with the virtual environment's python,
so that nothing of the checkout can be imported by accident. It sets TRITON_INTERPRET=1 itself, before
anything imports triton. Exits non-zero (an AssertionError or an exception) on the first failure.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.resources
import importlib.util
import json
import os
import pkgutil
import subprocess
import sys
import sysconfig
import time

# Must be set before triton is first imported (fastcontrast itself never imports it at import time).
os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402


def step(message: str) -> None:
    print(f"[smoke] {message}", flush=True)


def installed_here(path: str) -> bool:
    """True when ``path`` lies in this interpreter's site-packages (not a checkout, not an editable finder)."""
    site = os.path.realpath(sysconfig.get_paths()["purelib"])
    return os.path.realpath(path).startswith(site + os.sep)


def check_install_location() -> None:
    import fastcontrast

    kernels = importlib.import_module("fastcontrast.kernels")
    for module in (fastcontrast, kernels):
        assert installed_here(module.__file__), f"{module.__name__} imported from {module.__file__}, not site-packages"
    assert importlib.util.find_spec("kernels") is None, "a top-level `kernels` package is installed"
    dist = importlib.metadata.distribution("fastcontrast")
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    assert not direct_url.get("dir_info", {}).get("editable"), f"an editable install: {direct_url}"
    assert fastcontrast.__version__ == dist.version, f"__version__ {fastcontrast.__version__} != {dist.version}"
    assert importlib.resources.files("fastcontrast").joinpath("py.typed").is_file(), "py.typed is not installed"
    license_files = [f for f in dist.files or () if os.path.basename(str(f)) == "LICENSE"]
    assert license_files, "LICENSE is not in the installed distribution's metadata"
    assert dist.metadata["License-Expression"] == "Apache-2.0", dist.metadata["License-Expression"]
    step(f"fastcontrast {dist.version} installed in {os.path.dirname(fastcontrast.__file__)}")


def check_imports(triton_present: bool) -> None:
    """Every public name, and every module and subpackage of the installed package.

    A module may fail to import only for want of a third-party package that fastcontrast does not require
    (triton without [triton]; the libraries an integration patches): a missing ``fastcontrast.*`` module,
    i.e. a file the install lacks, always fails.
    """
    import fastcontrast

    assert "triton" not in sys.modules, "`import fastcontrast` imported triton"
    missing = [name for name in fastcontrast.__all__ if not hasattr(fastcontrast, name)]
    assert not missing, f"names in fastcontrast.__all__ that do not exist: {missing}"
    imported, optional = [], {}
    for info in pkgutil.walk_packages(fastcontrast.__path__, prefix="fastcontrast."):
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as exc:
            top = (exc.name or "").split(".")[0]
            if top in ("fastcontrast", "torch") or (triton_present and top == "triton"):
                raise
            optional.setdefault(top, []).append(info.name)
            continue
        imported.append(info.name)
    for expected in ("fastcontrast.functional", "fastcontrast.kernels", "fastcontrast.kernels.configs"):
        assert expected in imported, f"{expected} is not installed: {imported}"
    if triton_present:
        assert "fastcontrast.kernels.engine" in imported, imported
    else:
        assert "fastcontrast.kernels.engine" in optional.get("triton", []), optional
        assert "triton" not in sys.modules
    step(f"{len(fastcontrast.__all__)} public names and {len(imported)} modules import"
         + "".join(f"; {len(names)} more need {top}: {', '.join(names)}" for top, names in optional.items()))


def _features(n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).requires_grad_()


def check_losses(triton_present: bool) -> None:
    import fastcontrast as fc

    backends = ["reference", "torch"] + (["triton"] if triton_present else [])
    results = {}
    for backend in backends:
        a, b = _features(37, 48, 1), _features(37, 48, 2)
        scale = torch.tensor(1 / 0.07, requires_grad=True)
        loss = fc.ClipLoss(backend=backend)(a, b, scale)
        loss.backward()
        assert torch.isfinite(loss), f"{backend}: loss {loss}"
        results[backend] = (loss.detach(), a.grad, b.grad, scale.grad)
    expected = results["reference"]
    for backend, got in results.items():
        for name, x, y in zip(("loss", "grad image", "grad text", "grad scale"), got, expected):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=lambda m, b=backend, n=name: f"{b} {n}: {m}")
    step(f"ClipLoss forward + backward on CPU with backends {', '.join(backends)}: agree "
         f"(loss {float(expected[0]):.6f})")
    if not triton_present:
        try:
            fc.clip_loss(_features(8, 16, 3), _features(8, 16, 4), 10.0, backend="triton")
        except ImportError as exc:
            assert "triton" in str(exc), exc
            step(f"backend='triton' without triton raises ImportError: {exc}")
        else:
            raise AssertionError("backend='triton' ran without triton installed")


def check_one_kernel() -> None:
    """The forward LSE kernel in triton's interpreter (through the public ``blockwise_lse``, with the Triton
    engine) against torch.logsumexp of the materialised logits."""
    import triton
    from fastcontrast.kernels.engine import TritonEngine

    import fastcontrast

    a, b = _features(45, 40, 5).detach(), _features(29, 40, 6).detach()
    scale = torch.tensor(12.5)
    lse_row, lse_col = fastcontrast.blockwise_lse(a, b, scale, TritonEngine(), rows=True, cols=True)
    logits = scale.double() * a.double() @ b.double().T
    torch.testing.assert_close(lse_row.double(), torch.logsumexp(logits, dim=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_col.double(), torch.logsumexp(logits, dim=0), rtol=1e-5, atol=1e-5)
    step(f"lse_forward kernel in triton {triton.__version__}'s interpreter matches torch.logsumexp (45×29)")


def run_cli(*args: str, expect: tuple[str, ...] = (), env: dict | None = None) -> str:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fastcontrast", *args], capture_output=True, text=True,
                          env=env, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"python -m fastcontrast {' '.join(args)} exited {proc.returncode}:\n{output}"
    for text in expect:
        assert text in output, f"python -m fastcontrast {' '.join(args)}: {text!r} not in its output:\n{output}"
    last = [line for line in proc.stdout.splitlines() if line.strip()][-1]
    step(f"python -m fastcontrast {' '.join(args)}: ok in {time.perf_counter() - start:.1f} s ({last.strip()})")
    return output


def check_cli(triton_present: bool, kernel_table: bool, run_check: bool = True) -> None:
    import fastcontrast

    location = os.path.dirname(fastcontrast.__file__)
    if triton_present:
        import triton

        output = run_cli("info", expect=(fastcontrast.__version__, location, triton.__version__))
        assert "does not import" not in output, f"`info` says triton does not import:\n{output}"
    else:
        run_cli("info", expect=(fastcontrast.__version__, location, "not installed"))
        if run_check:
            user_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            run_cli("check", expect=("triton: skipped", "passed"), env=user_env)
    if triton_present and kernel_table:
        check_compile()


# One binary per target family, compiled by the installed fastcontrast.kernels.aot with triton's bundled ptxas /
# cuobjdump and its HIP backend (the whole table, `info --kernels`, takes about 40 minutes on 2 cores).
COMPILE_SAMPLE = """
import json
from fastcontrast.kernels import aot
found = aot.variants(archs=("sm_80", "sm_90", "gfx942"), dtypes=("bf16",), dims=(512,))
sample = [next(v for v in found if v.name == "panel_matmul_kernel" and v.arch == arch)
          for arch in ("sm_80", "sm_90", "gfx942")]
print(json.dumps(aot.compile_variants(sample, workers=1)))
"""


def check_compile() -> None:
    start = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real compilation, not the interpreter
    proc = subprocess.run([sys.executable, "-c", COMPILE_SAMPLE], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, f"compiling a kernel sample failed:\n{proc.stdout}{proc.stderr}"
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["arch"] for r in rows] == ["sm_80", "sm_90", "gfx942"], rows
    for row in rows:
        assert row["registers"] > 0 and not row["spill_stores"] and not row["stack"], row
    step(f"compiled panel_matmul_kernel for sm_80, sm_90, gfx942: ok in {time.perf_counter() - start:.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triton", choices=("present", "absent"), required=True,
                        help="whether triton is installed in this environment (what the smoke then expects)")
    parser.add_argument("--quick", action="store_true",
                        help="skip what the wheel's smoke runs on the same files: with triton, the sample "
                        "compilation for sm_80 / sm_90 / gfx942; without, `python -m fastcontrast check`")
    args = parser.parse_args()
    triton_present = args.triton == "present"
    assert (importlib.util.find_spec("triton") is not None) == triton_present, f"triton is not {args.triton}"
    here = os.path.realpath(os.getcwd())
    assert not os.path.exists(os.path.join(here, "fastcontrast")), f"run from a folder without the source: {here}"
    step(f"python {sys.version.split()[0]}, torch {torch.__version__}, cwd {here}")
    check_install_location()
    check_imports(triton_present)
    check_losses(triton_present)
    if triton_present:
        check_one_kernel()
    check_cli(triton_present, kernel_table=not args.quick, run_check=not args.quick)
    step("passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
