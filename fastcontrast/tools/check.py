"""``python -m fastcontrast check``: every backend available here against the naive reference.

For each loss, backend, dtype and shape it compares the loss value and the gradient of every input
(features, scale, bias) with the reference computed in float64 from the same (already rounded) inputs,
and prints a pass/fail table. The tolerances are those of the test suite: the result may differ from
exact arithmetic by the rounding of the output dtype plus fp32 accumulation.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from fastcontrast.tools.tolerances import ELEMENTWISE as TOLERANCES

DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Awkward sizes: a single-row edge, rows not dividing any block, d not a power of two.
SHAPES = ((1, 8), (37, 64), (130, 257))
LOSSES = ("clip", "siglip", "nt_xent")
SMALL_CHUNK = 4096  # bytes: forces the torch engine through many chunks even at these sizes


@dataclass
class Backend:
    label: str
    backend: str
    chunk_bytes: Optional[int] = None


def available_backends(device: torch.device, interpreter: bool) -> tuple[list, list]:
    """(backends to check, [(label, reason) skipped]) on ``device``."""
    from fastcontrast._dispatch import triton_import_error

    backends = [Backend("torch", "torch"), Backend("torch, 4 KiB chunks", "torch", SMALL_CHUNK)]
    skipped = []
    if device.type == "cuda" or interpreter:
        error = triton_import_error()
        if error is None:
            label = "triton" if device.type == "cuda" else "triton (interpreter)"
            backends.append(Backend(label, "triton"))
        else:
            skipped.append(("triton", f"triton does not import: {error}"))
    else:
        skipped.append(("triton", "needs CUDA (or --interpreter: its kernels in triton's CPU interpreter)"))
    return backends, skipped


def _inputs(loss: str, n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=gen, dtype=torch.float64)
    b = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if loss in ("clip", "siglip"):
        a = torch.nn.functional.normalize(a, dim=1)
        b = torch.nn.functional.normalize(b + a, dim=1)  # correlated pairs, like a trained model's
    # Round once to the dtype under test; the reference then works exactly on these values.
    a = a.to(dtype).to(device)
    b = b.to(dtype).to(device)
    scale = {"clip": 1 / 0.07, "siglip": 10.0, "nt_xent": None}[loss]
    bias = -10.0 if loss == "siglip" else None
    return a, b, scale, bias


def _run(loss: str, a, b, scale, bias, **kwargs):
    """Loss and gradients {name: tensor} for leaf copies of the inputs."""
    from fastcontrast import functional, reference

    a = a.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    leaves = {"a": a, "b": b}
    scalar_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    if scale is not None:
        leaves["scale"] = torch.tensor(scale, dtype=scalar_dtype, device=a.device, requires_grad=True)
    if bias is not None:
        leaves["bias"] = torch.tensor(bias, dtype=scalar_dtype, device=a.device, requires_grad=True)
    if kwargs.get("backend") == "reference-fp64":
        if loss == "clip":
            value = reference.clip_loss_reference(a, b, leaves["scale"])
        elif loss == "siglip":
            value = reference.siglip_loss_reference(a, b, leaves["scale"], leaves["bias"])
        else:
            value = reference.nt_xent_loss_reference(a, b, 0.5)
    elif loss == "clip":
        value = functional.clip_loss(a, b, leaves["scale"], **kwargs)
    elif loss == "siglip":
        value = functional.siglip_loss(a, b, leaves["scale"], leaves["bias"], **kwargs)
    else:
        value = functional.nt_xent_loss(a, b, 0.5, **kwargs)
    grads = torch.autograd.grad(value, list(leaves.values()))
    return value.detach(), dict(zip(leaves, grads))


def _error_ratio(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> float:
    """max |actual − expected| / (atol·M + rtol·|expected|), M = max |expected| (1 if that is 0).

    ≤ 1 passes; inf for a missing or non-finite result. ``atol`` is relative to the tensor's magnitude
    because feature gradients are O(scale / n): an absolute 5e-3 would let a gradient off by 2× pass.
    """
    if actual is None:
        return float("inf")
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    if actual.shape != expected.shape or not torch.isfinite(actual).all():
        return float("inf")
    magnitude = float(expected.abs().max()) or 1.0
    return float(((actual - expected).abs() / (atol * magnitude + rtol * expected.abs())).max())


def check_one(loss: str, backend: Backend, dtype: torch.dtype, n: int, d: int, device: torch.device) -> dict:
    """Compare one (loss, backend, dtype, shape) with the float64 reference."""
    a, b, scale, bias = _inputs(loss, n, d, dtype, device, seed=n * 1000 + d)
    atol, rtol = TOLERANCES[dtype]
    row = {"loss": loss, "backend": backend.label, "dtype": DTYPE_NAMES[dtype], "shape": f"{n}×{d}",
           "errors": {}, "worst": None, "ratio": None, "passed": False, "error": None}
    try:
        ref_value, ref_grads = _run(loss, a.double(), b.double(), scale, bias, backend="reference-fp64")
        kwargs = {"backend": backend.backend}
        if backend.chunk_bytes is not None:
            kwargs["chunk_bytes"] = backend.chunk_bytes
        value, grads = _run(loss, a, b, scale, bias, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a crash is a failure to report, not to raise
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return row
    names = {"a": "grad image", "b": "grad text", "scale": "grad scale", "bias": "grad bias"}
    if loss == "nt_xent":
        names.update(a="grad out0", b="grad out1")
    row["errors"]["loss"] = _error_ratio(value, ref_value, atol, rtol)
    for key, ref in ref_grads.items():
        row["errors"][names[key]] = _error_ratio(grads.get(key), ref, atol, rtol)
    worst = max(row["errors"], key=row["errors"].get)
    row["worst"], row["ratio"] = worst, row["errors"][worst]
    row["passed"] = row["ratio"] <= 1.0
    return row


def check_cli(args) -> int:
    """``python -m fastcontrast check``; returns the exit code (0 all passed, 1 any failure)."""
    device_arg = args.device
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg)
    interpreter = device.type == "cpu" and (
        args.interpreter or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
    if interpreter and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is first imported
    backends, skipped = available_backends(device, interpreter)
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    if device.type == "cpu":
        dtypes.insert(0, torch.float64)
    print(f"fastcontrast check on {device}: loss and gradients of every input against the float64 reference; "
          "error shown as max |err| / (atol·max|ref| + rtol·|ref|), pass ≤ 1")
    header = "| loss | backend | dtype | n×d | worst tensor | err / tol | result |"
    print()
    print(header)
    print("|---|---|---|---|---|---:|---|")
    failures = 0
    for loss in LOSSES:
        for backend in backends:
            for dtype in dtypes:
                if backend.backend == "triton" and dtype == torch.float64:
                    continue  # the kernels take fp16, bf16 and fp32
                for n, d in SHAPES:
                    row = check_one(loss, backend, dtype, n, d, device)
                    failures += not row["passed"]
                    if row["error"] is not None:
                        verdict, worst, ratio = f"FAIL: {row['error']}", "—", "—"
                    else:
                        verdict = "pass" if row["passed"] else "FAIL"
                        worst, ratio = row["worst"], f"{row['ratio']:.3f}"
                    print(f"| {loss} | {row['backend']} | {row['dtype']} | {row['shape']} | {worst} "
                          f"| {ratio} | {verdict} |", flush=True)
                    if args.verbose and row["errors"]:
                        details = ", ".join(f"{k} {v:.3f}" for k, v in row["errors"].items())
                        print(f"|   | | | | {details} | | |")
    for label, reason in skipped:
        print(f"\n{label}: skipped ({reason})")
    total = sum(1 for _ in _count(backends, dtypes))
    print(f"\n{total - failures}/{total} passed" + (f", {failures} FAILED" if failures else ""))
    return 1 if failures else 0


def _count(backends, dtypes):
    for _loss in LOSSES:
        for backend in backends:
            for dtype in dtypes:
                if backend.backend == "triton" and dtype == torch.float64:
                    continue
                yield from SHAPES
