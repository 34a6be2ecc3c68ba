"""``python -m fastcontrast gpu-check``: the one-shot check for the first GPU (README.md#first-run-on-a-gpu),
built for a cold machine lent for 15 minutes.

Sections, in this order, each in its own subprocess with its own timeout (a crash or a hang there costs that
section alone), each printing one line per check and appending its JSON record to ``DIR/gpu_check.jsonl``:

1. ``compile``: every kernel variant the run will launch (recorded from the sections' own workloads,
   :mod:`fastcontrast.tools.gpu_compile`), compiled in a process pool over the host's cores into triton's
   cache, before any timing; every later compile is logged as a cache miss;
2. ``probe``: CLIP, SigLIP and NT-Xent at N = 65,536, d = 768, bf16, forward + backward: median time, peak
   memory, per-kernel times, TFLOP/s of counted work and % of dense peak, the best naive loss beside it, the
   work model's prediction (a CPU subprocess computes it while the GPU sections run) and measured ÷ modelled
   (:mod:`fastcontrast.tools.gpu_measure`);
3. ``numerics``: multi-panel, ragged N ≈ 10,000, d ∈ {768, 1280}, bf16 and fp16, every loss against the fp64
   torch engine: the whole gradient and the negatives' term (the gradient minus the positive's
   contribution); then the width sweep at N ≈ 1000 (d ∈ {64, …, 1280}, fp16 at scale 100, fp32 IEEE and TF32);
4. ``crash``: fp32 under torch's new TF32 API, tensors on a device that is not the current one (two GPUs),
   tiny fp16 gradients at a realistic N, fp32 gradients on a near one-hot batch at scale 100, float64 CUDA
   features under ``backend="auto"``;
5. ``syncs``: one step of every loss with no host sync (``torch.cuda.set_sync_debug_mode("error")``) per dtype,
   then int64 offsets (B holding more than 2³¹ elements);
6. ``determinism``: the single-pass against the two-pass forward, argmax ties, bitwise determinism of two runs;
7. ``binaries``: every workload of the run launched, then the launched binaries against the compile table
   installed with the package (a spill, other registers or shared memory, or a binary it lacks fails);
8. ``ring``: the ring's per-block shapes (B = N / 8) timed in one process against one rectangular call;
9. ``max_n``: per loss, the largest N whose step fits in 90 % of the GPU, fused (peaks measured at N and 2N,
   extrapolated linearly, its memory being O(N·d), the line checked at 4N) against the best naive loss
   (searched by running it).

``--budget`` stops starting new sections past that many seconds, and no section runs past 1.25 × the budget;
a Markdown summary is written at the end (:data:`SUMMARY`), or from the JSONL by ``--summarize DIR`` when a
run was cut short. ``--plan`` prints the sections, the variant count and the time estimate without a GPU.

On a GPU the compile table has no checked binaries for (below sm_80, sm_12x, ROCm archs other than gfx90a /
gfx942: :mod:`fastcontrast._targets`), the engine under test is the blockwise torch engine, the one
``backend="auto"`` picks there; the Triton-only checks are skipped with the reason.

``--dry`` runs every section the same way, in subprocesses, at tiny shapes on the CPU in triton's interpreter
(times meaningless), so that the script cannot rot: the test suite runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from fastcontrast.tools import binaries
from fastcontrast.tools.tolerances import KERNEL_RELATIVE

LOSSES = ("clip", "siglip", "nt_xent", "memory_bank", "dcl", "dclw", "supcon", "distill", "coca")
TF32_RELATIVE = 5e-3  # TF32 rounds operands to 10 mantissa bits: about 2⁻¹¹ per product, summed over d
JSONL = "gpu_check.jsonl"
SUMMARY = "gpu_check.md"
# The sections in the order a GPU run takes them: the answers most wanted from a short loan first.
SECTIONS = ("compile", "probe", "numerics", "crash", "syncs", "determinism", "binaries", "ring", "max_n")
# Seconds each section may take on an H100 / H200 (its subprocess is killed past that), and what it is
# expected to take there (not yet timed on one: estimates). Each includes ~5 s of imports.
TIMEOUT_S = {"compile": 150, "probe": 90, "numerics": 90, "crash": 60, "syncs": 60, "determinism": 60,
             "binaries": 60, "ring": 45, "max_n": 90}
ESTIMATE_S = {"compile": 60, "probe": 40, "numerics": 45, "crash": 20, "syncs": 25, "determinism": 20,
              "binaries": 25, "ring": 15, "max_n": 50}
# With --dry the sections run in the interpreter on a shared CPU: only a hang is worth a timeout.
DRY_TIMEOUT_S = 300
# Fault injection for the tests: the named section aborts its process at start (as a segfault would), or
# hangs (as a deadlocked kernel would).
CRASH_ENV = "FASTCONTRAST_GPU_CHECK_CRASH"
HANG_ENV = "FASTCONTRAST_GPU_CHECK_HANG"
MODEL_SECTION = "model"  # the work model for the probe's case: a CPU subprocess beside the others
# The run's start (time.time()) handed to its sections, so every record's elapsed_s counts from it.
START_ENV = "FASTCONTRAST_GPU_CHECK_START"


@dataclass
class Sizes:
    """The shapes a run uses: the real ones on a GPU, tiny ones with ``--dry``."""

    n: int
    dims: tuple
    sweep_settings: tuple
    panel_n: int
    panel_dims: tuple
    int64_rows: int
    int64_cols: int
    int64_d: int
    determinism_n: int
    determinism_d: int
    fp16_n: int
    probe_n: int
    probe_d: int
    repeats: int
    ring_n: int
    ring_world: int
    max_n_start: int
    max_n_limit: int


# (dtype, TF32, scale) of the width sweep.
SWEEP = ((torch.bfloat16, False, 14.3), (torch.float16, False, 14.3), (torch.float16, False, 100.0),
         (torch.float32, False, 14.3), (torch.float32, True, 14.3))
GPU_SIZES = Sizes(n=1000, dims=(64, 128, 256, 257, 512, 1000, 1280), sweep_settings=SWEEP, panel_n=10007,
                  panel_dims=(768, 1280), int64_rows=64, int64_cols=(2**31 // 1280) + 4096, int64_d=1280,
                  determinism_n=16384, determinism_d=768, fp16_n=16384, probe_n=65536, probe_d=768, repeats=5,
                  ring_n=65536, ring_world=8, max_n_start=16384, max_n_limit=2**22)
# Tiny, and still on the same paths: the panel shapes span several interpreter panels (64 × 96) at a d past
# the interpreter's fused gradient (64).
DRY_SIZES = Sizes(n=40, dims=(48,), sweep_settings=(SWEEP[3],), panel_n=70, panel_dims=(72,),
                  int64_rows=8, int64_cols=300, int64_d=48, determinism_n=96, determinism_d=48, fp16_n=256,
                  probe_n=128, probe_d=32, repeats=1, ring_n=64, ring_world=4, max_n_start=64, max_n_limit=256)


class Report:
    """Prints one line per check and appends its JSON record to ``path`` at once, in one ``write`` to a file
    opened for appending, so records of concurrent processes (the model's beside a section's) never
    interleave."""

    def __init__(self, path: Optional[str], budget_s: float = float("inf")):
        self.path = path
        # In a section's process: the run's start, so that elapsed_s reads as one timeline across processes.
        self.start = time.monotonic() - max(0.0, time.time() - float(os.environ.get(START_ENV, time.time())))
        self.budget_s = budget_s
        self.failed = 0
        self.records: list = []
        self.section: Optional[str] = None

    def over_budget(self) -> bool:
        return time.monotonic() - self.start > self.budget_s

    def add(self, record: dict) -> None:
        record["elapsed_s"] = round(time.monotonic() - self.start, 2)
        if self.section is not None:
            record.setdefault("section", self.section)
        self.records.append(record)
        self.failed += record.get("status") == "fail"
        detail = ", ".join(f"{k}={v}" for k, v in record.items()
                           if k not in ("check", "status", "elapsed_s", "section", "traceback"))
        print(f"[{record['elapsed_s']:7.1f} s] {record['status']:>5}  {record['check']}: {detail}"[:2000], flush=True)
        if self.path:
            line = (json.dumps(record, default=str) + "\n").encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    def skip(self, check: str, reason: str) -> None:
        self.add({"check": check, "status": "skip", "reason": reason})

    def run(self, check: str, fn: Callable[[], dict], skip_reason: Optional[str] = None) -> None:
        if skip_reason is not None:
            self.skip(check, skip_reason)
            return
        if self.over_budget():
            self.skip(check, f"past the {self.budget_s:g} s budget")
            return
        try:
            record = fn()
        except Exception as exc:  # noqa: BLE001 - a crash is a result to report, then on to the next check
            record = {"status": "fail", "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc(limit=6)}
        self.add({"check": check, **record})


def read_records(path: str) -> list[dict]:
    """The JSONL's records (a line cut short by a killed process is skipped)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _unit(n, d, dtype, device, seed, near=None, noise=0.5):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if near is not None:
        x = near.double().cpu() + noise * x
    return torch.nn.functional.normalize(x, dim=1).to(device=device, dtype=dtype)


def _relative_errors(got, expected) -> dict:
    """Max error of the loss and each gradient, relative to that tensor's largest reference magnitude; for the
    scale gradient ⟨A, dA⟩/s, relative to the sum of its terms' magnitudes (the sum itself may cancel to ~0)."""
    errors = {}
    for name, g, e in zip(("loss", "grad_a", "grad_b", "grad_scale"), got, expected):
        magnitude = float(e.detach().double().abs().max())
        if name == "grad_scale":
            a, grad_a, scale = expected[-1]
            magnitude = max(magnitude, float((a.double() * grad_a.double()).abs().sum() / abs(scale)))
        errors[name] = float((g.detach().double() - e.detach().double()).abs().max() / max(magnitude, 1e-30))
    return errors


@dataclass(frozen=True)
class Plan:
    """Which engine the checks run, and why; ``table_arch``: the compile table's architecture standing for the
    device (None in the interpreter or where there is none)."""

    backend: str
    reason: str
    table_arch: Optional[str]

    def triton_only(self) -> Optional[str]:
        """The reason a Triton-only check is skipped, or None when the Triton engine is under test."""
        return None if self.backend == "triton" else f"Triton-only check: {self.reason}"


def engine_under_test(device: torch.device, dry: bool) -> Plan:
    """The Triton engine where the compile table has checked binaries for ``device`` (or in the interpreter,
    with ``--dry``), else the torch engine, as ``backend="auto"`` would pick."""
    if dry:
        return Plan("triton", "--dry: the Triton kernels in triton's interpreter", None)
    from fastcontrast._targets import triton_support

    support = triton_support(device)
    if support.checked:
        return Plan("triton", support.reason, support.table_arch)
    return Plan("torch", f"{support.reason}, so backend='auto' runs the torch engine there: its checks run, the "
                "Triton-only ones are skipped", None)


def _caption(n: int, device, dtype):
    """CoCa's caption logits [n, 5, 11] and token labels [n, 5] (pad id 0 included), the same for every dtype."""
    g = torch.Generator(device="cpu").manual_seed(n)
    logits = torch.randn(n, 5, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (n, 5), generator=g)
    # fp32 logits for half features: the caption part is open_clip's own cross-entropy, not under test.
    return logits.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32), labels.to(device)


def _loss_and_grads(loss, a, b, scale, backend):
    import fastcontrast as fc

    leaves = [a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_(),
              torch.tensor(scale, dtype=torch.float32 if a.dtype != torch.float64 else torch.float64,
                           device=a.device, requires_grad=True)]
    bank = torch.nn.functional.normalize(torch.randn(97, a.shape[1], device=a.device, generator=torch.Generator(
        device=a.device).manual_seed(7)), dim=1)
    calls = {
        "clip": lambda x, y, s: fc.clip_loss(x, y, s, backend=backend),
        "siglip": lambda x, y, s: fc.siglip_loss(x, y, s, -10.0, backend=backend),
        "nt_xent": lambda x, y, s: fc.nt_xent_loss(x, y, 0.1, backend=backend) + 0 * s,
        "memory_bank": lambda x, y, s: fc.nt_xent_memory_bank_loss(x, y, bank, 0.1, backend=backend) + 0 * s,
        "supcon": lambda x, y, s: fc.supcon_loss(x, torch.arange(x.shape[0], device=x.device) % 7,
                                                 temperature=0.1, backend=backend) + 0 * s,
        "distill": lambda x, y, s: sum(fc.distill_clip_loss(x, y, s, y, x, 20.0, backend=backend)),
        "dcl": lambda x, y, s: fc.dcl_loss(x, y, 0.1, backend=backend) + 0 * s,
        "dclw": lambda x, y, s: fc.dcl_loss(x, y, 0.1, fc.negative_mises_fisher_weights, backend=backend) + 0 * s,
        "coca": lambda x, y, s: sum(fc.CoCaLoss(2.0, 1.0, backend=backend)(x, y, *_caption(x.shape[0], x.device,
                                                                                            x.dtype), s)),
    }
    value = calls[loss](*leaves)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
    # The last entry lets the scale gradient's error be judged against the size of its terms.
    return [value.detach()] + grads + [(leaves[0].detach(), grads[0], scale)]


def _triton():
    from fastcontrast.kernels.engine import TritonEngine

    return TritonEngine()


def _tf32(enabled: bool):
    from fastcontrast.kernels.aot import _tf32 as context

    return context(enabled)


def check_crash_scenarios(report: Report, device: torch.device, sizes: Sizes, plan: Plan) -> None:
    import fastcontrast as fc

    backend = plan.backend

    def tf32_api():
        matmul = torch.backends.cuda.matmul
        if not hasattr(matmul, "fp32_precision"):
            return {"status": "skip", "reason": "torch < 2.9 has no fp32_precision API"}
        saved = matmul.fp32_precision
        try:
            matmul.fp32_precision = "tf32"
            a, b = _unit(sizes.n, 64, torch.float32, device, 1), _unit(sizes.n, 64, torch.float32, device, 2)
            loss = fc.clip_loss(a, b, 10.0, backend=backend)
            return {"status": "ok", "loss": float(loss.detach())}
        finally:
            matmul.fp32_precision = saved

    def other_device():
        if device.type != "cuda" or torch.cuda.device_count() < 2:
            return {"status": "skip", "reason": "needs two GPUs"}
        a, b = _unit(sizes.n, 128, torch.bfloat16, "cuda:1", 3), _unit(sizes.n, 128, torch.bfloat16, "cuda:1", 4)
        with torch.cuda.device(0):
            got = _loss_and_grads("clip", a, b, 14.3, backend)
        expected = _loss_and_grads("clip", a.double(), b.double(), 14.3, "torch")
        errors = _relative_errors(got, expected)
        ok = max(errors.values()) < KERNEL_RELATIVE[torch.bfloat16]
        return {"status": "ok" if ok else "fail", **errors}

    def fp16_tiny_gradients():
        n = sizes.fp16_n
        a = _unit(n, 64, torch.float16, device, 5)
        b = _unit(n, 64, torch.float16, device, 6, near=a)
        got = _loss_and_grads("clip", a, b, 14.3, backend)
        expected = _loss_and_grads("clip", a.double(), b.double(), 14.3, "torch")
        errors = _relative_errors(got, expected)
        ok = max(errors.values()) < KERNEL_RELATIVE[torch.float16]
        return {"status": "ok" if ok else "fail", "n": n, **errors}

    def fp32_near_one_hot():
        a = _unit(sizes.n // 4, 256, torch.float64, device, 8)
        b = _unit(sizes.n // 4, 256, torch.float64, device, 9, near=a, noise=0.05)
        expected = _loss_and_grads("clip", a, b, 100.0, "torch")
        errors = {}
        for backend in ("torch", "triton"):
            got = _loss_and_grads("clip", a.float(), b.float(), 100.0, backend)
            errors[backend] = max(float((g.double() - e).abs().max()) for g, e in zip(got[1:3], expected[1:3]))
        magnitude = max(float(e.abs().max()) for e in expected[1:3])
        ok = errors["triton"] <= 2 * errors["torch"] + 1e-9 * magnitude
        return {"status": "ok" if ok else "fail", "abs_error_torch": errors["torch"],
                "abs_error_triton": errors["triton"]}

    def float64_auto():
        from fastcontrast._dispatch import auto_backend

        backend, reason = auto_backend(device, torch.float64)
        a, b = _unit(64, 32, torch.float64, device, 10), _unit(64, 32, torch.float64, device, 11)
        fc.clip_loss(a, b, 10.0)  # must not reach the Triton kernels
        return {"status": "ok" if backend == "torch" or device.type != "cuda" else "fail", "auto": backend,
                "reason": reason}

    report.run("fp32 under the new TF32 API", tf32_api)
    report.run("tensors on a device other than the current one", other_device)
    report.run("fp16 gradients with dS below fp16 subnormals", fp16_tiny_gradients)
    # Compares the Triton engine's error with the torch engine's: nothing to compare when torch is under test.
    report.run("fp32 near one-hot batch at scale 100", fp32_near_one_hot, plan.triton_only())
    report.run("float64 CUDA features under auto", float64_auto)


def _positive_part(loss: str, a, b, scale: float):
    """The positive pairs' share of ``loss`` (float64 leaves ``a``, ``b``), or None for the losses whose
    positives are not one term per row (DCLW's weights, SupCon's classes, distillation, CoCa)."""
    import torch.nn.functional as F

    if loss == "clip":  # ½[mean(r − p) + mean(c − p)]: −mean(p)
        return -(scale * (a * b).sum(1)).mean()
    if loss == "siglip":  # the diagonal's softplus(−(s·aᵢ·bᵢ + b)) / n, bias −10 as in _loss_and_grads
        return F.softplus(-(scale * (a * b).sum(1) - 10.0)).sum() / a.shape[0]
    if loss in ("nt_xent", "memory_bank", "dcl"):  # mean over rows of −(âᵢ·b̂ᵢ)/τ, τ = 0.1
        return -((F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1) / 0.1).mean()
    return None


# Half an ulp of a dtype, relative: the error of one rounding to it.
HALF_ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


def _negatives_error(loss: str, a, b, scale: float, got, expected) -> Optional[tuple[float, float]]:
    """(max error of the features' gradients relative to the largest entry of their negatives' term, the
    bound it is held to), or None where the loss has no such split. The negatives' term is the fp64 gradient
    minus the fp64 gradient of :func:`_positive_part`. The bound is twice the dtype's kernel tolerance plus the
    floor two roundings to the input dtype set (dS before the second product, the gradient on output): one
    ulp of the largest gradient entry, relative to the negatives' largest. Where the positives dominate, as
    in SigLIP with bias −10, that floor is most of it."""
    leaves = [a.detach().double().requires_grad_(), b.detach().double().requires_grad_()]
    part = _positive_part(loss, *leaves, scale)
    if part is None:
        return None
    positive = torch.autograd.grad(part, leaves)
    errors, bounds = [], []
    for g, e, p in zip(got[1:3], expected[1:3], positive):
        e = e.double()
        negatives = max(float((e - p).abs().max()), 1e-30)
        errors.append(float((g.double() - e).abs().max()) / negatives)
        bounds.append(2 * KERNEL_RELATIVE[a.dtype] + 2 * HALF_ULP[a.dtype] * float(e.abs().max()) / negatives)
    worst = max(range(len(errors)), key=lambda i: errors[i] / bounds[i])
    return errors[worst], bounds[worst]


def _panel_inputs(sizes: Sizes, d: int, dtype, device):
    a = _unit(sizes.panel_n, d, dtype, device, d)
    return a, _unit(sizes.panel_n, d, dtype, device, d + 1, near=a)


def check_multi_panel_numerics(report: Report, device: torch.device, sizes: Sizes, plan: Plan) -> None:
    """Every loss at a ragged N spanning several dS panels, bf16 and fp16, against the fp64 torch engine: the
    whole gradient (bound: the dtype's kernel tolerance) and the negatives' term (bound: twice that; it is the
    smaller part, where fp16 underflow shows first)."""
    for d in sizes.panel_dims:
        for dtype in (torch.bfloat16, torch.float16):
            def check(d=d, dtype=dtype):
                a, b = _panel_inputs(sizes, d, dtype, device)
                whole, negatives, negatives_bound = {}, {}, {}
                for loss in LOSSES:
                    expected = _loss_and_grads(loss, a.double(), b.double(), 14.3, "torch")
                    got = _loss_and_grads(loss, a, b, 14.3, plan.backend)
                    whole[loss] = max(_relative_errors(got, expected).values())
                    split = _negatives_error(loss, a, b, 14.3, got, expected)
                    if split is not None:
                        negatives[loss], negatives_bound[loss] = split
                bound = KERNEL_RELATIVE[dtype]
                ok = max(whole.values()) <= bound and all(negatives[k] <= negatives_bound[k] for k in negatives)

                def rounded(values):
                    return {k: float(f"{v:.3g}") for k, v in values.items()}

                return {"status": "ok" if ok else "fail", "n": sizes.panel_n, "bound": bound,
                        "gradient": rounded(whole), "negatives": rounded(negatives),
                        "negatives_bound": rounded(negatives_bound),
                        "negatives_not_separated": [k for k in LOSSES if k not in negatives]}

            report.run(f"multi-panel numerics N={sizes.panel_n} d={d} {_dtype_name(dtype)}", check)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_numerics(report: Report, device: torch.device, sizes: Sizes, plan: Plan) -> None:
    """The width sweep at N ≈ 1000: every loss, every setting of :data:`SWEEP` the sizes name."""
    for d in sizes.dims:
        for dtype, tf32, scale in sizes.sweep_settings:
            def check(d=d, dtype=dtype, tf32=tf32, scale=scale):
                a = _unit(sizes.n, d, dtype, device, d)
                b = _unit(sizes.n, d, dtype, device, d + 1, near=a)
                worst = {}
                for loss in LOSSES:
                    expected = _loss_and_grads(loss, a.double(), b.double(), scale, "torch")
                    with _tf32(tf32):
                        got = _loss_and_grads(loss, a, b, scale, plan.backend)
                    worst[loss] = max(_relative_errors(got, expected).values())
                bound = TF32_RELATIVE if tf32 else KERNEL_RELATIVE[dtype]
                return {"status": "ok" if max(worst.values()) <= bound else "fail", "bound": bound,
                        **{k: f"{v:.2e}" for k, v in worst.items()}}

            name = f"numerics d={d} {_dtype_name(dtype)}{' tf32' if tf32 else ''} scale={scale:g}"
            report.run(name, check)



def check_host_syncs(report: Report, device: torch.device) -> None:
    """One forward + backward of every loss per dtype with nothing read back to the host: on CUDA under
    ``torch.cuda.set_sync_debug_mode("error")`` (a sync raises), on the CPU (``--dry``) through the recorder
    the test suite uses. The losses run on the engine ``backend="auto"`` picks (fastcontrast.tools.sync_check)."""
    from fastcontrast.tools.sync_check import HostSyncRecorder, accelerator_branches, run_one_step_of_every_loss

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        def check(dtype=dtype):
            if device.type == "cuda":
                losses = run_one_step_of_every_loss(device, dtype)
                return {"status": "ok", "losses": len(losses)}
            # The CPU takes the accelerator's branches of the input checks (no host reads of the values).
            with accelerator_branches(), HostSyncRecorder() as recorder:
                losses = run_one_step_of_every_loss(device, dtype)
            events = [f"{e.kind} {e.op} at {e.where}" for e in recorder.events]
            return {"status": "fail" if events else "ok", "losses": len(losses), "syncs": events[:5]}

        report.run(f"no host sync per step {str(dtype).replace('torch.', '')}", check)


def _int64_inputs(sizes: Sizes, device):
    rows, cols, d = sizes.int64_rows, sizes.int64_cols, sizes.int64_d
    a = _unit(rows, d, torch.bfloat16, device, 20).requires_grad_()
    g = torch.Generator(device=device).manual_seed(21)
    b = torch.nn.functional.normalize(torch.randn(cols, d, device=device, generator=g), dim=1).to(
        torch.bfloat16).requires_grad_()
    positives = torch.arange(rows, device=device) * (cols // rows)
    return a, b, positives


def _int64_step(a, b, positives, engine):
    import fastcontrast as fc

    lse, _, pos = fc.blockwise_lse_and_positives(a, b, torch.tensor(10.0, device=a.device), engine, positives)
    (lse - pos).sum().backward()
    return lse


def check_int64_offsets(report: Report, device: torch.device, sizes: Sizes, plan: Plan) -> None:
    def check():
        cols, d = sizes.int64_cols, sizes.int64_d
        a, b, positives = _int64_inputs(sizes, device)
        lse = _int64_step(a, b, positives, _triton())
        # The last rows of B lie past 2³¹ elements from its start: their logits and gradients must be right.
        logits = 10.0 * a.detach().float() @ b.detach().float().T
        expected_lse = torch.logsumexp(logits, dim=1)
        # dB = s·(Pᵀ·A − onehot(positives)ᵀ·A); its last rows lie past 2³¹ elements from B's start.
        tail = torch.arange(max(0, cols - 512), cols, device=device)
        weights = torch.exp(logits[:, tail] - expected_lse[:, None])
        weights -= (positives[:, None] == tail[None, :]).float()
        expected_tail = 10.0 * weights.T @ a.detach().float()
        lse_error = float((lse - expected_lse).abs().max())
        tail_error = float((b.grad[tail].float() - expected_tail).abs().max() / expected_tail.abs().max())
        ok = bool(torch.isfinite(b.grad).all()) and lse_error < 1e-2 and tail_error < KERNEL_RELATIVE[torch.bfloat16]
        return {"status": "ok" if ok else "fail", "elements_of_b": cols * d, "max_lse_error": lse_error,
                "tail_grad_relative_error": tail_error}

    report.run("int64 offsets past 2^31 elements", check, plan.triton_only())


def _single_vs_two_pass(a, b, device):
    """The forward's row and column LSEs from one pass and from two (the scratch limit at 0)."""
    import fastcontrast as fc
    from fastcontrast.kernels import engine

    scale = torch.tensor(14.3, device=device)
    index = torch.arange(a.shape[0], device=device)
    one = fc.blockwise_lse_and_positives(a, b, scale, _triton(), index, cols=True)
    saved = engine.SINGLE_PASS_SCRATCH_BYTES
    engine.SINGLE_PASS_SCRATCH_BYTES = 0
    try:
        two = fc.blockwise_lse_and_positives(a, b, scale, _triton(), index, cols=True)
    finally:
        engine.SINGLE_PASS_SCRATCH_BYTES = saved
    return one, two


def _argmax_ties(rows: int, d: int, device):
    import fastcontrast as fc

    a = torch.zeros(rows, d, device=device, dtype=torch.bfloat16)
    a[:, 0] = 1  # every logit equal: every argmax must be index 0, across tiles, splits and row blocks
    _, _, _, argmax_row, argmax_col = fc.blockwise_lse_and_positives(
        a, a.clone(), torch.tensor(5.0, device=device), _triton(), torch.arange(rows, device=device),
        cols=True, return_argmax=True)
    return argmax_row, argmax_col


def check_paths_and_determinism(report: Report, device: torch.device, sizes: Sizes, plan: Plan) -> None:
    n, d = sizes.determinism_n, sizes.determinism_d

    def single_vs_two_pass():
        one, two = _single_vs_two_pass(_unit(n, d, torch.bfloat16, device, 30), _unit(n, d, torch.bfloat16, device, 31),
                                       device)
        error = max(float((x - y).abs().max()) for x, y in zip(one, two))
        return {"status": "ok" if error < 1e-4 else "fail", "max_difference": error}

    def argmax_ties():
        argmax_row, argmax_col = _argmax_ties(n // 8, d, device)
        ok = bool((argmax_row == 0).all() and (argmax_col == 0).all())
        return {"status": "ok" if ok else "fail"}

    def determinism():
        a, b = _unit(n, d, torch.bfloat16, device, 32), _unit(n, d, torch.bfloat16, device, 33, near=None)
        runs = [_loss_and_grads("clip", a, b, 14.3, plan.backend)[:4] for _ in range(2)]
        same = all(torch.equal(x, y) for x, y in zip(*runs))
        return {"status": "ok" if same else "fail", "bitwise_equal": same}

    report.run("single-pass vs two-pass forward", single_vs_two_pass, plan.triton_only())
    report.run("argmax ties", argmax_ties, plan.triton_only())
    report.run(f"bitwise determinism N={n} d={d}", determinism)


def check_binaries(report: Report, device: torch.device, table_path: Optional[str], plan: Plan,
                   launch: Optional[Callable[[], None]] = None) -> None:
    """The launched binaries against the compile table; ``launch`` first launches what is to be compared
    (in its own process this section has launched nothing yet)."""
    def check():
        # The table first: a missing or empty one fails here, on a GPU or not (never a silent "not found").
        table, where = binaries.load_table(table_path)
        if device.type != "cuda":
            return {"status": "skip", "reason": "no compiled binary (the interpreter runs no binaries)",
                    "table": where, "table_rows": len(table["rows"])}
        if launch is not None:
            launch()
        result = binaries.compare_with_table(binaries.launched_binaries(plan.table_arch), table["rows"],
                                             plan.table_arch)
        if not result["binaries"]:
            return {"status": "fail", "reason": "the workloads launched no Triton binary", "table": where}
        return {**result, "table": where}

    report.run("launched binaries match the compile table", check, plan.triton_only())


def workloads(sizes: Sizes, device: torch.device) -> list:
    """(section, label, run(device, backend)) for every kernel-launching call of the sections, at their
    shapes: what the compile section records and compiles, and what the binaries section launches. The
    max-N section is not here: its sizes are found at run time (its compiles are logged as cache misses)."""
    from fastcontrast.tools import gpu_measure
    from fastcontrast.tools.sync_check import loss_steps

    out: list = []
    for loss in gpu_measure.PROBE_LOSSES:
        def probe(device, backend, loss=loss):
            gpu_measure.fused_step(loss, *gpu_measure.probe_inputs(sizes.probe_n, sizes.probe_d, device), backend)

        out.append(("probe", f"{loss} N={sizes.probe_n} d={sizes.probe_d} bf16", probe))
    for d in sizes.panel_dims:
        for dtype in (torch.bfloat16, torch.float16):
            def panel(device, backend, d=d, dtype=dtype):
                a, b = _panel_inputs(sizes, d, dtype, device)
                for loss in LOSSES:
                    _loss_and_grads(loss, a, b, 14.3, backend)

            out.append(("numerics", f"multi-panel N={sizes.panel_n} d={d} {_dtype_name(dtype)}", panel))
    for d in sizes.dims:
        for dtype, tf32, scale in sizes.sweep_settings:
            def sweep(device, backend, d=d, dtype=dtype, tf32=tf32, scale=scale):
                a = _unit(sizes.n, d, dtype, device, d)
                b = _unit(sizes.n, d, dtype, device, d + 1, near=a)
                with _tf32(tf32):
                    for loss in LOSSES:
                        _loss_and_grads(loss, a, b, scale, backend)

            out.append(("numerics", f"sweep d={d} {_dtype_name(dtype)}{' tf32' if tf32 else ''} scale={scale:g}",
                        sweep))

    def crash(device, backend):
        with _tf32(True):
            _loss_and_grads("clip", _unit(sizes.n, 64, torch.float32, device, 1),
                            _unit(sizes.n, 64, torch.float32, device, 2), 10.0, backend)
        a = _unit(sizes.fp16_n, 64, torch.float16, device, 5)
        _loss_and_grads("clip", a, _unit(sizes.fp16_n, 64, torch.float16, device, 6, near=a), 14.3, backend)
        a = _unit(sizes.n // 4, 256, torch.float32, device, 8)
        _loss_and_grads("clip", a, _unit(sizes.n // 4, 256, torch.float32, device, 9, near=a, noise=0.05), 100.0,
                        backend)

    out.append(("crash", "TF32 API, fp16 tiny gradients, fp32 near one-hot", crash))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        def syncs(device, backend, dtype=dtype):
            for _, step in loss_steps(device, dtype):
                step()

        out.append(("syncs", f"one step of every loss {_dtype_name(dtype)}", syncs))
    if device.type == "cuda":  # B alone is GBs: recorded on a GPU only
        out.append(("syncs", "int64 offsets", lambda device, backend: _int64_step(*_int64_inputs(sizes, device),
                                                                                   _triton())))

    def determinism(device, backend):
        n, d = sizes.determinism_n, sizes.determinism_d
        _single_vs_two_pass(_unit(n, d, torch.bfloat16, device, 30), _unit(n, d, torch.bfloat16, device, 31), device)
        _argmax_ties(n // 8, d, device)
        _loss_and_grads("clip", _unit(n, d, torch.bfloat16, device, 32), _unit(n, d, torch.bfloat16, device, 33),
                        14.3, backend)

    out.append(("determinism", f"N={sizes.determinism_n} d={sizes.determinism_d}", determinism))

    def ring(device, backend):
        from fastcontrast._dispatch import resolve_engine

        engine = resolve_engine(backend, device, torch.bfloat16)
        image, text = (t.detach() for t in gpu_measure.probe_inputs(sizes.ring_n, sizes.probe_d, device))
        rows = sizes.ring_n // sizes.ring_world
        scale = torch.full((), 14.3, device=device)
        for world in (sizes.ring_world, 1):
            gpu_measure.ring_rank_step(image[:rows], text[:rows], image, text, scale, engine, world)

    out.append(("ring", f"N={sizes.ring_n} world={sizes.ring_world}", ring))
    return out


@dataclass
class Context:
    """What a section needs: where it runs, at which sizes, which engine, and where the records go."""

    device: torch.device
    sizes: Sizes
    plan: Plan
    dry: bool
    table_path: Optional[str] = None
    path: Optional[str] = None
    device_name: str = field(default="")


def section_compile(report: Report, ctx: Context) -> None:
    from collections import Counter

    from fastcontrast.tools import gpu_compile

    if ctx.device.type == "cuda":
        from fastcontrast.kernels.configs import target_for

        target = target_for(ctx.device)
    else:
        target = ("cuda", 90)
    arch = gpu_compile.arch_name(target)
    if ctx.plan.backend != "triton":  # nothing of the Triton engine launches here
        report.skip("compile plan", ctx.plan.triton_only())
        report.skip("compile into triton's cache", ctx.plan.triton_only())
        return
    start = time.perf_counter()
    variants, per_workload = gpu_compile.record_variants(workloads(ctx.sizes, ctx.device), target, ctx.device)
    errors = [{k: v for k, v in w.items() if k != "digests"} for w in per_workload if "error" in w]
    table_arch = ctx.plan.table_arch or arch
    missing = _not_in_table(variants, table_arch, ctx.table_path)
    lacking = {m["digest"] for m in missing or []}
    report.add({"check": "compile plan", "status": "fail" if errors else "info", "arch": arch,
                "variants": len(variants), "workloads": len(per_workload),
                "by_kernel": dict(Counter(v.name for v in variants)), "record_s": round(time.perf_counter() - start, 2),
                "errors": errors[:5], "table_arch": table_arch,
                "not_in_table": None if missing is None else len(missing),
                "not_in_table_first": [{k: v for k, v in m.items() if k != "digest"} for m in (missing or [])[:10]],
                "not_in_table_from": sorted({w["workload"] for w in per_workload if lacking & set(w["digests"])})})
    if ctx.dry:
        report.skip("compile into triton's cache", f"--dry: no GPU target here (the interpreter compiles nothing); "
                    f"the plan above is what {arch} would launch at the --dry shapes")
        return
    workers = os.cpu_count() or 1
    start = time.perf_counter()

    def on_result(result: dict) -> None:
        if "error" in result:
            report.add({"check": "compile", "status": "fail", **result})
        elif not result["cache_hit"]:
            report.add({"check": "cache miss (compiled)", "status": "info", **result})

    results = gpu_compile.compile_in_pool([gpu_compile.variant_spec(v) for v in variants], workers, on_result)
    failed = sum("error" in r for r in results)
    report.add({"check": "compile into triton's cache", "status": "fail" if failed else "ok", "arch": arch,
                "variants": len(results), "compiled": sum(not r.get("cache_hit", True) for r in results),
                "already_cached": sum(bool(r.get("cache_hit")) for r in results), "failed": failed,
                "workers": workers, "seconds": round(time.perf_counter() - start, 2)})


def _not_in_table(variants: list, table_arch: str, table_path: Optional[str]) -> Optional[list]:
    """The planned variants the compile table lacks for ``table_arch`` (None when the table cannot be read:
    the binaries section reports that)."""
    from fastcontrast.tools import gpu_compile

    try:
        table, _ = binaries.load_table(table_path)
    except (OSError, ValueError):
        return None
    return gpu_compile.not_in_table(variants, table_arch, table["rows"])


def _model_record(path: Optional[str], loss: str, sizes: Sizes, device_name: str) -> Optional[dict]:
    from fastcontrast.tools import gpu_measure

    if not path or not os.path.exists(path):
        return None
    return gpu_measure.pick_model(read_records(path), loss, sizes.probe_n, sizes.probe_d, device_name)


def section_probe(report: Report, ctx: Context) -> None:
    from fastcontrast.tools import gpu_measure

    s = ctx.sizes
    for loss in gpu_measure.PROBE_LOSSES:
        def check(loss=loss):
            record = gpu_measure.probe(loss, s.probe_n, s.probe_d, ctx.device, ctx.plan.backend, s.repeats,
                                       ctx.device_name, ctx.dry)
            model = _model_record(ctx.path, loss, s, ctx.device_name)  # in by now, or joined by the summary
            if model is not None:
                record.update(flops=model["flops"], flops_counted="the work model's counted FLOPs",
                              modelled_s=model["modelled_s"], measured_over_modelled=record["median_s"] /
                              model["modelled_s"], model_gpu=model["gpu"])
                record["tflops"] = model["flops"] / record["median_s"] / 1e12
                peak = gpu_measure.dense_peak(ctx.device_name)
                record["percent_of_dense_peak"] = None if peak is None else 100 * record["tflops"] * 1e12 / peak
            return record

        report.run(f"probe {loss} N={s.probe_n} d={s.probe_d} bf16", check)


def section_model(report: Report, ctx: Context) -> None:
    """The work model's prediction for the probe's cases (in triton's interpreter, on the CPU)."""
    from fastcontrast.tools import gpu_measure

    s = ctx.sizes
    for loss in gpu_measure.PROBE_LOSSES:
        report.run(f"model {loss} N={s.probe_n} d={s.probe_d}",
                   lambda loss=loss: {"status": "info", **gpu_measure.model_records(loss, s.probe_n, s.probe_d)})


def section_numerics(report: Report, ctx: Context) -> None:
    check_multi_panel_numerics(report, ctx.device, ctx.sizes, ctx.plan)
    check_numerics(report, ctx.device, ctx.sizes, ctx.plan)


def section_syncs(report: Report, ctx: Context) -> None:
    check_host_syncs(report, ctx.device)
    check_int64_offsets(report, ctx.device, ctx.sizes, ctx.plan)


def section_binaries(report: Report, ctx: Context) -> None:
    def launch():
        for _, _, run in workloads(ctx.sizes, ctx.device):
            run(ctx.device, ctx.plan.backend)

    check_binaries(report, ctx.device, ctx.table_path, ctx.plan, launch)


def section_ring(report: Report, ctx: Context) -> None:
    from fastcontrast.tools import gpu_measure

    s = ctx.sizes

    def check():
        record = gpu_measure.ring_timing(s.ring_n, s.probe_d, s.ring_world, ctx.device, ctx.plan.backend, s.repeats)
        return {"status": "ok", **record, **({"note": gpu_measure.DRY_NOTE} if ctx.dry else {})}

    report.run(f"ring per-block shapes N={s.ring_n} world={s.ring_world}", check)


def section_max_n(report: Report, ctx: Context) -> None:
    from fastcontrast.tools import gpu_measure

    s = ctx.sizes
    if ctx.device.type != "cuda":
        for loss in gpu_measure.PROBE_LOSSES:
            report.skip(f"largest N in 90% of memory {loss}", "needs CUDA memory statistics "
                        "(torch.cuda.max_memory_allocated); --dry has none")
        return
    total = torch.cuda.get_device_properties(ctx.device).total_memory
    torch.cuda.set_per_process_memory_fraction(0.9, ctx.device)
    budget = 0.9 * total
    for loss in gpu_measure.PROBE_LOSSES:
        def check(loss=loss):
            return {"status": "ok", "memory_budget_bytes": int(budget),
                    **gpu_measure.max_n(loss, s.probe_d, ctx.device, ctx.plan.backend, budget, s.probe_n,
                                        s.max_n_start, s.max_n_limit)}

        report.run(f"largest N in 90% of memory {loss} d={s.probe_d}", check)


def section_crash(report: Report, ctx: Context) -> None:
    check_crash_scenarios(report, ctx.device, ctx.sizes, ctx.plan)


def section_determinism(report: Report, ctx: Context) -> None:
    check_paths_and_determinism(report, ctx.device, ctx.sizes, ctx.plan)


SECTION_FUNCTIONS = {"compile": section_compile, "probe": section_probe, "numerics": section_numerics,
                     "crash": section_crash, "syncs": section_syncs, "determinism": section_determinism,
                     "binaries": section_binaries, "ring": section_ring, "max_n": section_max_n,
                     MODEL_SECTION: section_model}


def _device(dry: bool) -> torch.device:
    if dry:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("gpu-check needs a CUDA GPU (use --dry to run it on the CPU in triton's interpreter)")
    return torch.device("cuda")


def _context(dry: bool, table_path: Optional[str], path: Optional[str]) -> Context:
    from fastcontrast.tools.bench.cases import device_name

    device = _device(dry)
    return Context(device, DRY_SIZES if dry else GPU_SIZES, engine_under_test(device, dry), dry, table_path, path,
                   device_name(device))


def run_section(name: str, out_dir: Optional[str], dry: bool, table_path: Optional[str] = None,
                plan: Optional[Plan] = None) -> int:
    """Run one section in this process, appending to ``out_dir``'s JSONL; returns its failed checks. An
    exception that escapes a section is its failure, recorded."""
    if os.environ.get(CRASH_ENV) == name:
        os.abort()  # the tests' stand-in for a segfault or a CUDA error that kills the process
    if os.environ.get(HANG_ENV) == name:
        time.sleep(3600)
    path = os.path.join(out_dir, JSONL) if out_dir else None
    report = Report(path)
    report.section = name
    try:
        if name == MODEL_SECTION:  # CPU work in the interpreter: it never touches the GPU
            ctx = Context(torch.device("cpu"), DRY_SIZES if dry else GPU_SIZES,
                          Plan("triton", "the work model counts the Triton kernels", None), dry, table_path, path)
        else:
            ctx = _context(dry, table_path, path)
        if plan is not None:
            ctx.plan = plan
        if not dry and name not in ("compile", MODEL_SECTION):
            from fastcontrast.tools import gpu_compile

            gpu_compile.log_cache_misses(report.add)
        SECTION_FUNCTIONS[name](report, ctx)
    except Exception as exc:  # noqa: BLE001 - the section's answer is its failure
        report.add({"check": f"section {name}", "status": "fail", "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(limit=8)})
    return report.failed


def _section_env(name: str, dry: bool, run_start: Optional[float] = None) -> dict:
    """The section's environment: triton's interpreter on for --dry and for the work model, off for the
    compile section (``triton.compile`` cannot take the interpreter's functions) and every GPU section."""
    env = dict(os.environ)
    env[START_ENV] = repr(time.time() if run_start is None else run_start)
    if (dry and name != "compile") or name == MODEL_SECTION:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def _section_command(name: str, out_dir: str, dry: bool, table_path: Optional[str]) -> list[str]:
    command = [sys.executable, "-m", "fastcontrast", "gpu-check", "--section", name, "--out", out_dir]
    return command + (["--dry"] if dry else []) + (["--table", table_path] if table_path else [])


def _stderr_tail(path: str, limit: int = 3000) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()[-limit:]
    except OSError:
        return ""


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _run_isolated(name: str, out_dir: str, dry: bool, table_path: Optional[str], timeout: float,
                  run_start: Optional[float] = None) -> dict:
    """Run a section in its own subprocess with ``timeout``; the section record (its checks wrote their own)."""
    os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
    stderr_path = os.path.join(out_dir, "logs", f"{name}.stderr")
    start = time.monotonic()
    with open(stderr_path, "w") as stderr:
        # Its own session, so that a timeout kills the section with everything it started (the compile
        # pool's workers would otherwise go on compiling under the next sections' timings).
        proc = subprocess.Popen(_section_command(name, out_dir, dry, table_path),
                                env=_section_env(name, dry, run_start), stdout=None, stderr=stderr,
                                start_new_session=True)
        try:
            returncode, timed_out = proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            returncode, timed_out = None, True
    record = {"check": f"section {name}", "seconds": round(time.monotonic() - start, 2), "timeout_s": round(timeout),
              "returncode": returncode, "stderr": os.path.relpath(stderr_path, out_dir)}
    if timed_out:
        record.update(status="fail", reason=f"killed after its {timeout:.0f} s timeout", stderr_tail=_stderr_tail(
            stderr_path))
    elif returncode == 0 or (returncode == 1 and _recorded_a_failure(out_dir, name)):
        record["status"] = "done"  # its checks' records say what passed and what failed
    else:  # a signal, or an exit before any check could record why (an import error, say)
        reason = f"crashed (signal {-returncode})" if returncode < 0 else f"exited with {returncode}"
        record.update(status="fail", reason=reason, stderr_tail=_stderr_tail(stderr_path))
    return record


def _recorded_a_failure(out_dir: str, name: str) -> bool:
    return any(r.get("section") == name and r.get("status") == "fail"
               for r in read_records(os.path.join(out_dir, JSONL)))


def _start_model(out_dir: str, dry: bool, run_start: float) -> subprocess.Popen:
    """The work model for the probe's cases, in a CPU subprocess beside the GPU sections (it counts in the
    interpreter: about 30 s per loss on one core); its records land in the same JSONL."""
    stderr = open(os.path.join(out_dir, "logs", f"{MODEL_SECTION}.stderr"), "w")
    return subprocess.Popen(_section_command(MODEL_SECTION, out_dir, dry, None),
                            env=_section_env(MODEL_SECTION, dry, run_start),
                            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)


def gpu_check(out_dir: Optional[str], budget_s: float, dry: bool, table_path: Optional[str] = None,
              sections: Optional[tuple] = None, isolate: bool = True) -> int:
    """Run the sections (default: all, in :data:`SECTIONS` order), each in its own subprocess unless
    ``isolate`` is False (the tests' in-process run); returns the number of failed checks and sections."""
    import tempfile

    sections = tuple(sections or SECTIONS)
    device = _device(dry)
    if out_dir is None:
        out_dir = tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
    path = os.path.join(out_dir, JSONL)
    open(path, "w").close()
    run_start = time.time()  # the sections' clocks start here too
    report = Report(path, budget_s)
    from fastcontrast.tools.bench.cases import environment

    report.add({"check": "environment", "status": "info", "dry": dry, **environment(device)})
    plan = engine_under_test(device, dry)
    report.add({"check": "engine under test", "status": "info", "backend": plan.backend, "reason": plan.reason})
    deadline = 1.25 * budget_s
    timeouts = {name: DRY_TIMEOUT_S if dry else TIMEOUT_S[name] for name in sections}
    report.add({"check": "sections", "status": "info", "order": list(sections), "timeouts_s": timeouts,
                "budget_s": budget_s, "deadline_s": deadline, "isolated": isolate})
    model = None
    if "probe" in sections and isolate:
        model = _start_model(out_dir, dry, run_start)
    for name in sections:
        elapsed = time.monotonic() - report.start
        if elapsed > budget_s:
            report.skip(f"section {name}", f"past the {budget_s:g} s budget")
            continue
        if isolate:
            timeout = min(timeouts[name], max(1.0, deadline - elapsed))
            report.add(_run_isolated(name, out_dir, dry, table_path, timeout, run_start))
        else:
            start = time.monotonic()
            if name == "compile":
                report.skip("section compile", "in-process run: recording needs a process without TRITON_INTERPRET")
                continue
            if name == "probe" and dry:
                run_section(MODEL_SECTION, out_dir, dry, table_path, plan)
            run_section(name, out_dir, dry, table_path, plan)
            report.add({"check": f"section {name}", "status": "done", "seconds": round(time.monotonic() - start, 2)})
    if model is not None:
        try:
            model.wait(timeout=max(1.0, deadline - (time.monotonic() - report.start)))
        except subprocess.TimeoutExpired:
            _kill_group(model)
            report.add({"check": f"section {MODEL_SECTION}", "status": "skip",
                        "reason": "the work model did not finish before the deadline"})
        if model.returncode not in (0, 1, -9):
            stderr_path = os.path.join(out_dir, "logs", f"{MODEL_SECTION}.stderr")
            report.add({"check": f"section {MODEL_SECTION}", "status": "fail", "returncode": model.returncode,
                        "reason": "the work model's process crashed", "stderr_tail": _stderr_tail(stderr_path)})
    _add_measured_over_modelled(report, read_records(path))
    from fastcontrast.tools.gpu_summary import write_summary

    records = read_records(path)
    failed = sum(r.get("status") == "fail" for r in records)
    summary = write_summary(out_dir)
    checks = sum(1 for r in records if r.get("status") in ("ok", "fail", "skip"))
    print(f"{checks} checks, {failed} failed; JSON lines in {path}, summary in {summary}", flush=True)
    return failed


def _add_measured_over_modelled(report: Report, records: list[dict]) -> None:
    """One ``info`` record per probed loss: measured ÷ modelled for the step and per kernel kind, once the
    work model's records are in (the probe may have finished first)."""
    from fastcontrast.tools import gpu_measure

    env = next((r for r in records if r.get("check") == "environment"), {})
    for probe in (r for r in records if r.get("check", "").startswith("probe ") and r.get("status") == "ok"):
        model = gpu_measure.pick_model(records, probe["loss"], probe["n"], probe["d"], env.get("device_name", ""))
        if model is None:
            continue
        kernels = {}
        for kernel, measured in probe.get("kernels", {}).items():
            modelled = model["kernels"].get(kernel, {}).get("modelled_s")
            if modelled:
                kernels[kernel] = {"measured_s": measured["ms"] / 1e3, "modelled_s": modelled,
                                   "measured_over_modelled": measured["ms"] / 1e3 / modelled}
        report.add({"check": f"measured over modelled {probe['loss']} N={probe['n']} d={probe['d']}",
                    "status": "info", "model_gpu": model["gpu"], "measured_s": probe["median_s"],
                    "modelled_s": model["modelled_s"],
                    "measured_over_modelled": probe["median_s"] / model["modelled_s"], "kernels": kernels})


def print_plan(dry: bool, arch: Optional[str]) -> int:
    """``--plan``: the sections in order with their timeouts and estimates, then the variants the run will
    compile (recorded from the workloads: on the GPU when there is one and no ``arch``, else on the CPU for
    ``arch``, sm_90 by default) and the time estimate. Needs no GPU."""
    from collections import Counter

    from fastcontrast.tools import gpu_compile

    sizes = DRY_SIZES if dry else GPU_SIZES
    on_gpu = arch is None and torch.cuda.is_available() and not dry
    device = torch.device("cuda") if on_gpu else torch.device("cpu")
    if on_gpu:
        from fastcontrast.kernels.configs import target_for

        target = target_for(device)
    else:
        target = gpu_compile.parse_arch(arch or "sm_90")
    print(f"gpu-check plan ({'--dry shapes' if dry else 'GPU shapes'}, variants for {gpu_compile.arch_name(target)}, "
          f"recorded on {device.type})", flush=True)
    start = time.perf_counter()
    variants, per_workload = gpu_compile.record_variants(workloads(sizes, device), target, device)
    table_arch = gpu_compile.arch_name(target)
    if on_gpu:
        from fastcontrast._targets import triton_support

        table_arch = triton_support(device).table_arch or table_arch
    lacking = _not_in_table(variants, table_arch, None)
    lacking_digests = {v["digest"] for v in lacking or []}
    for entry in per_workload:
        error = f"  ERROR {entry['error']}" if "error" in entry else ""
        outside = len(lacking_digests & set(entry["digests"]))
        note = f", {outside} not in the table" if outside else ""
        print(f"  {entry['section']:<12} {entry['workload']:<52} +{entry['new_variants']:>3} variants "
              f"({entry['seconds']:.1f} s{note}){error}", flush=True)
    missing = ["max_n (its N is found at run time; its compiles show as cache misses)"]
    if device.type != "cuda":
        missing.insert(0, "int64 offsets (B alone is GBs: recorded on a GPU only)")
    print(f"  not recorded here: {'; '.join(missing)}", flush=True)
    workers = 16
    compile_s = 20 + -(-len(variants) // workers) * COMPILE_S_PER_VARIANT
    estimates = {**ESTIMATE_S, "compile": round(compile_s)}
    kinds = ", ".join(f"{kernel} {count}" for kernel, count in sorted(Counter(v.name for v in variants).items()))
    print(f"\n{len(variants)} variants to compile ({kinds}); recorded in {time.perf_counter() - start:.1f} s",
          flush=True)
    if lacking:
        print(f"{len(lacking)} of them not in the compile table for {table_arch} (the binaries section would "
              "fail on them):", flush=True)
        for v in lacking:
            print(f"  {v['kernel']} {v['dtype']} {v['precision']} {v['block']} {v['flags']}", flush=True)
    elif lacking is not None:
        print(f"every one of them is in the compile table for {table_arch}", flush=True)
    print("\nsection        timeout  estimate (H100 / H200, not yet timed)")
    for name in SECTIONS:
        print(f"  {name:<12} {TIMEOUT_S[name]:>5} s  {estimates[name]:>5} s")
    print(f"  {'total':<12} {sum(TIMEOUT_S.values()):>5} s  {sum(estimates.values()):>5} s   (compile: {workers} "
          f"workers × {COMPILE_S_PER_VARIANT:g} s per variant + 20 s start)")
    print(f"\nEstimate {sum(estimates.values())} s; the default --budget 480 s starts no section past 480 s and "
          f"ends every section by {1.25 * 480:.0f} s.")
    return 1 if any("error" in entry for entry in per_workload) else 0


# Seconds per variant per core on a GPU host (the compile table takes ~2 s per binary per core on the
# 2-core development CPU, ptxas and cuobjdump included): an estimate.
COMPILE_S_PER_VARIANT = 4.0


def gpu_check_cli(args) -> int:
    interpreter_on = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if args.summarize:
        from fastcontrast.tools.gpu_summary import write_summary

        if not os.path.isfile(os.path.join(args.summarize, JSONL)):
            raise SystemExit(f"--summarize: no {JSONL} in {args.summarize}")

        with open(write_summary(args.summarize), encoding="utf-8") as f:
            print(f.read())
        return 0
    if args.plan:
        if interpreter_on:  # recording specialises for a GPU target: triton's own jit functions are needed
            command = [sys.executable, "-m", "fastcontrast", "gpu-check", "--plan"] + (["--dry"] if args.dry else [])
            command += ["--arch", args.arch] if args.arch else []
            return subprocess.run(command, env=_section_env("compile", False)).returncode
        return print_plan(args.dry, args.arch)
    if args.section:
        return 1 if run_section(args.section, args.out, args.dry, args.table) else 0
    sections = tuple(name for name in SECTIONS if name in args.sections) if args.sections else None
    return 1 if gpu_check(args.out, args.budget, args.dry, args.table, sections) else 0
