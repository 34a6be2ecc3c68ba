"""``python -m fastcontrast gpu-check``: the one-shot check for the first GPU (README.md#first-run-on-a-gpu).

In order of risk, each check printing one line and appending one JSON line to ``DIR/gpu_check.jsonl`` as it
finishes (a run stopped by a timeout still leaves every answer so far):

1. the crash scenarios of the GPU-ready issue: fp32 under torch's new TF32 API, tensors on a device that is
   not the current one (with two GPUs), tiny fp16 gradients at a realistic N, fp32 gradients on a near one-hot
   batch at scale 100, float64 CUDA features under ``backend="auto"``;
2. numerics against float64 for every loss and the core: bf16, fp16 (scale 100 included), fp32 IEEE and TF32,
   d ∈ {64, 128, 256, 257, 512, 1000, 1280}, N ≈ 1000;
3. one step of every loss with no host sync (on CUDA under ``torch.cuda.set_sync_debug_mode("error")``), in
   bf16, fp16 and fp32; then int64 offsets: few rows against enough columns that B holds more than 2³¹
   elements (d = 1280);
4. the single-pass against the two-pass forward, argmax ties, and bitwise determinism of two runs
   (N = 16384, d = 768);
5. the launched binaries, read from triton's cache, against the compile table installed with the package
   (``fastcontrast/kernels/compile_table.json``; ``--table`` for another): a spill, a register count or
   shared-memory size other than the table's, or a binary the table does not hold, fails;
6. TFLOP/s of forward and backward, and fused against naive forward + backward, at N ∈ {16384, 65536} and
   d ∈ {256, 512, 768, 1024}, plus d = 1000 against 1024.

On a GPU the compile table has no checked binaries for (below sm_80, sm_12x, ROCm archs other than gfx90a /
gfx942: :mod:`fastcontrast._targets`), the engine under test is the blockwise torch engine, the one
``backend="auto"`` picks there: the checks that compare engines run it instead of the Triton one, and the
Triton-only checks (int64 offsets, the forward's two paths, argmax ties, the binaries) are skipped with
the reason. The first line after the environment says which engine is under test and why.

It fits in 8 minutes on one H100 / H200, compilation included; ``--budget`` stops starting new checks past
that many seconds. ``--dry`` runs the same script at tiny shapes on the CPU, in triton's interpreter, so
that it cannot rot (the test suite runs it).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastcontrast.tools import binaries
from fastcontrast.tools.tolerances import KERNEL_RELATIVE

DIMS = (64, 128, 256, 257, 512, 1000, 1280)
PERF_N = (16384, 65536)
PERF_DIMS = (256, 512, 768, 1024)
TF32_RELATIVE = 5e-3  # TF32 rounds operands to 10 mantissa bits: about 2⁻¹¹ per product, summed over d


@dataclass
class Sizes:
    """The shapes a run uses: the real ones on a GPU, tiny ones with ``--dry``."""

    n: int
    dims: tuple
    int64_rows: int
    int64_cols: int
    int64_d: int
    determinism_n: int
    determinism_d: int
    perf_n: tuple
    perf_dims: tuple
    fp16_n: int


GPU_SIZES = Sizes(1000, DIMS, 64, (2**31 // 1280) + 4096, 1280, 16384, 768, PERF_N, PERF_DIMS, 16384)
DRY_SIZES = Sizes(40, (48, 64, 257), 8, 300, 48, 96, 48, (128,), (64,), 256)


class Report:
    """Prints one line per check and appends its JSON record to ``path`` at once."""

    def __init__(self, path: Optional[str], budget_s: float):
        self.path = path
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.failed = 0
        self.records: list = []

    def over_budget(self) -> bool:
        return time.monotonic() - self.start > self.budget_s

    def add(self, record: dict) -> None:
        record["elapsed_s"] = round(time.monotonic() - self.start, 2)
        self.records.append(record)
        self.failed += record.get("status") == "fail"
        detail = ", ".join(f"{k}={v}" for k, v in record.items() if k not in ("check", "status", "elapsed_s"))
        print(f"[{record['elapsed_s']:7.1f} s] {record['status']:>5}  {record['check']}: {detail}", flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=str) + "\n")

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


def check_numerics(report: Report, device: torch.device, sizes: Sizes, plan: Plan) -> None:
    losses = ("clip", "siglip", "nt_xent", "memory_bank", "dcl", "dclw", "supcon", "distill", "coca")
    settings = [(torch.bfloat16, False, 14.3), (torch.float16, False, 14.3), (torch.float16, False, 100.0),
                (torch.float32, False, 14.3), (torch.float32, True, 14.3)]
    for d in sizes.dims:
        for dtype, tf32, scale in settings:
            def check(d=d, dtype=dtype, tf32=tf32, scale=scale):
                a = _unit(sizes.n, d, dtype, device, d)
                b = _unit(sizes.n, d, dtype, device, d + 1, near=a)
                worst = {}
                for loss in losses:
                    expected = _loss_and_grads(loss, a.double(), b.double(), scale, "torch")
                    with _tf32(tf32):
                        got = _loss_and_grads(loss, a, b, scale, plan.backend)
                    worst[loss] = max(_relative_errors(got, expected).values())
                bound = TF32_RELATIVE if tf32 else KERNEL_RELATIVE[dtype]
                return {"status": "ok" if max(worst.values()) <= bound else "fail", "bound": bound,
                        **{k: f"{v:.2e}" for k, v in worst.items()}}

            name = f"numerics d={d} {str(dtype).replace('torch.', '')}{' tf32' if tf32 else ''} scale={scale:g}"
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


def check_int64_offsets(report: Report, device: torch.device, sizes: Sizes, plan: Plan) -> None:
    def check():
        import fastcontrast as fc

        rows, cols, d = sizes.int64_rows, sizes.int64_cols, sizes.int64_d
        a = _unit(rows, d, torch.bfloat16, device, 20).requires_grad_()
        g = torch.Generator(device=device).manual_seed(21)
        b = torch.nn.functional.normalize(torch.randn(cols, d, device=device, generator=g), dim=1).to(
            torch.bfloat16).requires_grad_()
        scale = torch.tensor(10.0, device=device)
        positives = torch.arange(rows, device=device) * (cols // rows)
        lse, _, pos = fc.blockwise_lse_and_positives(a, b, scale, _triton(), positives)
        (lse - pos).sum().backward()
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


def check_paths_and_determinism(report: Report, device: torch.device, sizes: Sizes, plan: Plan) -> None:
    import fastcontrast as fc
    from fastcontrast.kernels import engine

    n, d = sizes.determinism_n, sizes.determinism_d

    def single_vs_two_pass():
        a, b = _unit(n, d, torch.bfloat16, device, 30), _unit(n, d, torch.bfloat16, device, 31)
        scale = torch.tensor(14.3, device=device)
        index = torch.arange(n, device=device)
        one = fc.blockwise_lse_and_positives(a, b, scale, _triton(), index, cols=True)
        saved = engine.SINGLE_PASS_SCRATCH_BYTES
        engine.SINGLE_PASS_SCRATCH_BYTES = 0
        try:
            two = fc.blockwise_lse_and_positives(a, b, scale, _triton(), index, cols=True)
        finally:
            engine.SINGLE_PASS_SCRATCH_BYTES = saved
        error = max(float((x - y).abs().max()) for x, y in zip(one, two))
        return {"status": "ok" if error < 1e-4 else "fail", "max_difference": error}

    def argmax_ties():
        a = torch.zeros(n // 8, d, device=device, dtype=torch.bfloat16)
        a[:, 0] = 1  # every logit equal: every argmax must be index 0, across tiles, splits and row blocks
        _, _, _, argmax_row, argmax_col = fc.blockwise_lse_and_positives(
            a, a.clone(), torch.tensor(5.0, device=device), _triton(), torch.arange(n // 8, device=device),
            cols=True, return_argmax=True)
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


def check_binaries(report: Report, device: torch.device, table_path: Optional[str], plan: Plan) -> None:
    def check():
        # The table first: a missing or empty one fails here, on a GPU or not (never a silent "not found").
        table, where = binaries.load_table(table_path)
        if device.type != "cuda":
            return {"status": "skip", "reason": "no compiled binary (the interpreter runs no binaries)",
                    "table": where, "table_rows": len(table["rows"])}
        result = binaries.compare_with_table(binaries.launched_binaries(plan.table_arch), table["rows"],
                                             plan.table_arch)
        if not result["binaries"]:
            return {"status": "fail", "reason": "the checks before this one launched no Triton binary",
                    "table": where}
        return {**result, "table": where}

    report.run("launched binaries match the compile table", check, plan.triton_only())


def _time(fn, device, repeats=3) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3 / repeats
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - begin) / repeats


def check_performance(report: Report, device: torch.device, sizes: Sizes, plan: Plan) -> None:
    import fastcontrast as fc

    dims = list(sizes.perf_dims) + ([1000] if device.type == "cuda" else [])
    for n in sizes.perf_n:
        for d in dims:
            def check(n=n, d=d):
                a = _unit(n, d, torch.bfloat16, device, 40).requires_grad_()
                b = _unit(n, d, torch.bfloat16, device, 41).requires_grad_()
                scale = torch.tensor(14.3, device=device, requires_grad=True)
                flops = 2 * n * n * d

                def forward():
                    return fc.clip_loss(a, b, scale, backend=plan.backend)

                def train(backend):
                    value = fc.clip_loss(a, b, scale, backend=backend)
                    torch.autograd.grad(value, [a, b, scale])

                forward_s = _time(lambda: forward().detach(), device)
                fused_s = _time(lambda: train(plan.backend), device)
                record = {"status": "ok", "backend": plan.backend, "n": n, "d": d, "forward_s": forward_s,
                          "forward_backward_s": fused_s,
                          "forward_tflops": flops / forward_s / 1e12,
                          "backward_tflops": 3 * flops / max(fused_s - forward_s, 1e-9) / 1e12}
                try:
                    naive_s = _time(lambda: train("reference"), device, repeats=1)
                    record.update(naive_s=naive_s, speedup=naive_s / fused_s)
                except torch.OutOfMemoryError:
                    record.update(naive_s=None, naive="out of memory")
                return record

            report.run(f"performance CLIP bf16 N={n} d={d}", check)


def gpu_check(out_dir: Optional[str], budget_s: float, dry: bool, table_path: Optional[str] = None) -> int:
    """Run every check (``table_path``: the compile table, None for the installed one); returns the number of
    failed checks."""
    if dry:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("gpu-check needs a CUDA GPU (use --dry to run it on the CPU in triton's interpreter)")
    else:
        device = torch.device("cuda")
    sizes = DRY_SIZES if dry else GPU_SIZES
    path = None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "gpu_check.jsonl")
        open(path, "w").close()
    report = Report(path, budget_s)
    from fastcontrast.tools.bench.cases import environment

    report.add({"check": "environment", "status": "info", "dry": dry, **environment(device)})
    plan = engine_under_test(device, dry)
    report.add({"check": "engine under test", "status": "info", "backend": plan.backend, "reason": plan.reason})
    check_crash_scenarios(report, device, sizes, plan)
    check_numerics(report, device, sizes, plan)
    check_host_syncs(report, device)
    check_int64_offsets(report, device, sizes, plan)
    check_paths_and_determinism(report, device, sizes, plan)
    check_binaries(report, device, table_path, plan)
    check_performance(report, device, sizes, plan)
    print(f"{len(report.records) - 2} checks, {report.failed} failed"
          + (f"; JSON lines in {path}" if path else ""), flush=True)
    return report.failed


def gpu_check_cli(args) -> int:
    if args.dry and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        if "triton" in sys.modules:
            raise SystemExit("gpu-check --dry needs TRITON_INTERPRET=1 before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
    return 1 if gpu_check(args.out, args.budget, args.dry, args.table) else 0
