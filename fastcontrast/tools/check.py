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
# Every loss family: the two-tower losses (CLIP, SigLIP, distillation, CoCa's contrastive part), the
# single-tower ones (NT-Xent, DCL, DCLW, SupCon), the memory bank, and sentence-transformers' MNRL (every
# direction, one hard negative per query).
LOSSES = ("clip", "siglip", "nt_xent", "memory_bank", "dcl", "dclw", "distill", "coca", "supcon", "mnrl")
MNRL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
SMALL_CHUNK = 4096  # bytes: forces the torch engine through many chunks even at these sizes
BANK_SIZE = 50
DISTILL_SCALE = 20.0  # the teacher's exponentiated logit scale
COCA_WEIGHTS = {"caption_loss_weight": 2.0, "clip_loss_weight": 1.0}


def shapes_for(loss: str) -> tuple:
    """The (n, d) a loss is checked at: DCL takes the positive out of the denominator, so one pair (2 rows)
    leaves a row no candidate at all (LSE of nothing: −inf in lightly too); its edge case is 2 pairs. MNRL's
    single query over all four directions has two near-equal candidates whose gradients cancel to ~1e-5 of
    their terms, below what a magnitude-relative tolerance can judge in fp32; its edge case is 2 queries."""
    if loss in ("dcl", "dclw", "mnrl"):
        return tuple(((2, d) if n == 1 else (n, d)) for n, d in SHAPES)
    return SHAPES


@dataclass
class Backend:
    label: str
    backend: str
    chunk_bytes: Optional[int] = None


def available_backends(device: torch.device, interpreter: bool) -> tuple[list, list]:
    """(backends to check, [(label, reason) skipped]) on ``device``."""
    from fastcontrast._dispatch import triton_import_error
    from fastcontrast._targets import triton_support

    backends = [Backend("torch", "torch"), Backend("torch, 4 KiB chunks", "torch", SMALL_CHUNK)]
    skipped = []
    support = triton_support(device) if device.type == "cuda" else None
    if support is not None and not support.checked:
        skipped.append(("triton", support.reason))
    elif device.type == "cuda" or interpreter:
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
    """(a, b, scale, bias, extras) rounded once to ``dtype``; ``extras``: the memory bank, the teacher's
    features, CoCa's caption logits and labels, SupCon's labels, as each loss needs."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=gen, dtype=torch.float64)
    b = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if loss in ("clip", "siglip", "distill", "coca", "mnrl"):
        # Unit rows, as the models hand them over (for MNRL's cos_sim, which normalises in the input dtype as
        # sentence-transformers does, unit rows are also what keeps that step from adding a rounding).
        a = torch.nn.functional.normalize(a, dim=1)
        b = torch.nn.functional.normalize(b + a, dim=1)  # correlated pairs, like a trained model's
    # Round once to the dtype under test; the reference then works exactly on these values.
    a = a.to(dtype).to(device)
    b = b.to(dtype).to(device)
    scale = {"clip": 1 / 0.07, "siglip": 10.0, "distill": 1 / 0.07, "coca": 1 / 0.07}.get(loss)
    bias = -10.0 if loss == "siglip" else None
    extras = {}
    if loss == "memory_bank":
        # lightly keeps the bank in fp32 whatever the features' dtype.
        bank = torch.nn.functional.normalize(torch.randn(BANK_SIZE, d, generator=gen, dtype=torch.float64), dim=1)
        extras["bank"] = bank.float().to(device)
    elif loss == "distill":
        teacher = torch.nn.functional.normalize(torch.randn(2, n, d, generator=gen, dtype=torch.float64), dim=2)
        extras["teacher"] = teacher.to(dtype).to(device)
    elif loss == "coca":
        # fp32 caption logits for half features (fp64 for fp64): that part is open_clip's own cross-entropy.
        logits = torch.randn(n, 5, 11, generator=gen, dtype=torch.float64)
        extras["logits"] = logits.to(torch.float64 if dtype == torch.float64 else torch.float32).to(device)
        extras["labels"] = torch.randint(0, 11, (n, 5), generator=gen).to(device)
    elif loss == "supcon":
        extras["labels"] = (torch.arange(n) % 3).to(device)
    elif loss == "mnrl":
        negative = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
        extras["negative"] = negative.to(dtype).to(device)
    return a, b, scale, bias, extras


def _run(loss: str, a, b, scale, bias, extras: dict, **kwargs):
    """Loss and gradients {name: tensor} for leaf copies of the inputs (``backend="reference-fp64"``: the
    naive reference, with the extras in float64)."""
    import fastcontrast
    from fastcontrast import functional, reference

    naive = kwargs.get("backend") == "reference-fp64"
    if naive:
        extras = {k: v.double() if v.is_floating_point() else v for k, v in extras.items()}
    a = a.detach().clone().requires_grad_(True)
    leaves = {"a": a}
    if loss != "supcon":  # SupCon takes one tower
        leaves["b"] = b = b.detach().clone().requires_grad_(True)
    if loss == "mnrl":
        leaves["negative"] = extras["negative"].detach().clone().requires_grad_(True)
    scalar_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    if scale is not None:
        leaves["scale"] = torch.tensor(scale, dtype=scalar_dtype, device=a.device, requires_grad=True)
    if bias is not None:
        leaves["bias"] = torch.tensor(bias, dtype=scalar_dtype, device=a.device, requires_grad=True)
    if loss == "coca":
        leaves["logits"] = extras["logits"].detach().clone().requires_grad_(True)
    if naive:
        if loss == "clip":
            value = reference.clip_loss_reference(a, b, leaves["scale"])
        elif loss == "siglip":
            value = reference.siglip_loss_reference(a, b, leaves["scale"], leaves["bias"])
        elif loss == "nt_xent":
            value = reference.nt_xent_loss_reference(a, b, 0.5)
        elif loss == "memory_bank":
            value = reference.nt_xent_memory_bank_loss_reference(a, b, extras["bank"], 0.5)
        elif loss in ("dcl", "dclw"):
            weight_fn = functional.negative_mises_fisher_weights if loss == "dclw" else None
            value = reference.dcl_loss_reference(a, b, 0.1, weight_fn)
        elif loss == "distill":
            value = sum(reference.distill_clip_loss_reference(a, b, leaves["scale"], *extras["teacher"],
                                                              DISTILL_SCALE))
        elif loss == "coca":
            value = (COCA_WEIGHTS["clip_loss_weight"] * reference.clip_loss_reference(a, b, leaves["scale"])
                     + COCA_WEIGHTS["caption_loss_weight"]
                     * reference.caption_loss_reference(leaves["logits"], extras["labels"]))
        elif loss == "mnrl":
            from fastcontrast.losses.mnrl import cos_sim

            value = reference.mnrl_loss_reference(a, a, [b, leaves["negative"]], 20.0, cos_sim, MNRL_DIRECTIONS)
        else:
            value = reference.supcon_loss_reference(a, extras["labels"], 0.1)
    elif loss == "clip":
        value = functional.clip_loss(a, b, leaves["scale"], **kwargs)
    elif loss == "siglip":
        value = functional.siglip_loss(a, b, leaves["scale"], leaves["bias"], **kwargs)
    elif loss == "nt_xent":
        value = functional.nt_xent_loss(a, b, 0.5, **kwargs)
    elif loss == "memory_bank":
        value = functional.nt_xent_memory_bank_loss(a, b, extras["bank"], 0.5, **kwargs)
    elif loss in ("dcl", "dclw"):
        weight_fn = functional.negative_mises_fisher_weights if loss == "dclw" else None
        value = functional.dcl_loss(a, b, 0.1, weight_fn, **kwargs)
    elif loss == "distill":
        value = sum(functional.distill_clip_loss(a, b, leaves["scale"], *extras["teacher"], DISTILL_SCALE,
                                                 **kwargs))
    elif loss == "coca":
        coca = fastcontrast.CoCaLoss(**COCA_WEIGHTS, **kwargs)
        value = sum(coca(a, b, leaves["logits"], extras["labels"], leaves["scale"]))
    elif loss == "mnrl":
        value = functional.multiple_negatives_ranking_loss([a, b, leaves["negative"]], 20.0,
                                                           directions=MNRL_DIRECTIONS, **kwargs)
    else:
        value = functional.supcon_loss(a, extras["labels"], temperature=0.1, **kwargs)
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
    a, b, scale, bias, extras = _inputs(loss, n, d, dtype, device, seed=n * 1000 + d)
    atol, rtol = TOLERANCES[dtype]
    if loss == "mnrl" and dtype in (torch.float16, torch.bfloat16):
        # cos_sim normalises in the input dtype, as sentence-transformers does: one more rounding of the
        # features than the fp64 reference sees, amplified by the scale (20), so twice the usual tolerance.
        atol, rtol = 2 * atol, 2 * rtol
    row = {"loss": loss, "backend": backend.label, "dtype": DTYPE_NAMES[dtype], "shape": f"{n}×{d}",
           "errors": {}, "worst": None, "ratio": None, "passed": False, "error": None}
    try:
        ref_value, ref_grads = _run(loss, a.double(), b.double(), scale, bias, extras, backend="reference-fp64")
        kwargs = {"backend": backend.backend}
        if backend.chunk_bytes is not None:
            kwargs["chunk_bytes"] = backend.chunk_bytes
        value, grads = _run(loss, a, b, scale, bias, extras, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a crash is a failure to report, not to raise
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return row
    names = {"a": "grad image", "b": "grad text", "scale": "grad scale", "bias": "grad bias",
             "logits": "grad caption logits", "negative": "grad hard negative"}
    if loss in ("nt_xent", "memory_bank", "dcl", "dclw"):
        names.update(a="grad out0", b="grad out1")
    elif loss == "supcon":
        names.update(a="grad embeddings")
    elif loss == "mnrl":
        names.update(a="grad queries", b="grad positives")
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
                for n, d in shapes_for(loss):
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
    for loss in LOSSES:
        for backend in backends:
            for dtype in dtypes:
                if backend.backend == "triton" and dtype == torch.float64:
                    continue
                yield from shapes_for(loss)
