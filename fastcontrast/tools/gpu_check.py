"""``python -m fastcontrast gpu-check``: the one-shot check for the first GPU (README.md#first-run-on-a-gpu).

In order of risk, each check printing one line and appending one JSON line to ``DIR/gpu_check.jsonl`` as it
finishes (a run stopped by a timeout still leaves every answer so far):

1. the crash scenarios of the GPU-ready issue: fp32 under torch's new TF32 API, tensors on a device that is
   not the current one (with two GPUs), tiny fp16 gradients at a realistic N, fp32 gradients on a near one-hot
   batch at scale 100, float64 CUDA features under ``backend="auto"``;
2. numerics against float64 for every loss and the core: bf16, fp16 (scale 100 included), fp32 IEEE and TF32,
   d ∈ {64, 128, 256, 257, 512, 1000, 1280}, N ≈ 1000;
3. int64 offsets: few rows against enough columns that B holds more than 2³¹ elements (d = 1280);
4. the single-pass against the two-pass forward, argmax ties, and bitwise determinism of two runs
   (N = 16384, d = 768);
5. the launched binaries' registers and spills, read from triton's cache, against the committed compile table;
6. TFLOP/s of forward and backward, and fused against naive forward + backward, at N ∈ {16384, 65536} and
   d ∈ {256, 512, 768, 1024}, plus d = 1000 against 1024.

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

    def run(self, check: str, fn: Callable[[], dict]) -> None:
        if self.over_budget():
            self.add({"check": check, "status": "skip", "reason": f"past the {self.budget_s:g} s budget"})
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


def check_crash_scenarios(report: Report, device: torch.device, sizes: Sizes) -> None:
    import fastcontrast as fc

    def tf32_api():
        matmul = torch.backends.cuda.matmul
        if not hasattr(matmul, "fp32_precision"):
            return {"status": "skip", "reason": "torch < 2.9 has no fp32_precision API"}
        saved = matmul.fp32_precision
        try:
            matmul.fp32_precision = "tf32"
            a, b = _unit(sizes.n, 64, torch.float32, device, 1), _unit(sizes.n, 64, torch.float32, device, 2)
            loss = fc.clip_loss(a, b, 10.0, backend="triton")
            return {"status": "ok", "loss": float(loss.detach())}
        finally:
            matmul.fp32_precision = saved

    def other_device():
        if device.type != "cuda" or torch.cuda.device_count() < 2:
            return {"status": "skip", "reason": "needs two GPUs"}
        a, b = _unit(sizes.n, 128, torch.bfloat16, "cuda:1", 3), _unit(sizes.n, 128, torch.bfloat16, "cuda:1", 4)
        with torch.cuda.device(0):
            got = _loss_and_grads("clip", a, b, 14.3, "triton")
        expected = _loss_and_grads("clip", a.double(), b.double(), 14.3, "torch")
        errors = _relative_errors(got, expected)
        ok = max(errors.values()) < KERNEL_RELATIVE[torch.bfloat16]
        return {"status": "ok" if ok else "fail", **errors}

    def fp16_tiny_gradients():
        n = sizes.fp16_n
        a = _unit(n, 64, torch.float16, device, 5)
        b = _unit(n, 64, torch.float16, device, 6, near=a)
        got = _loss_and_grads("clip", a, b, 14.3, "triton")
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
    report.run("fp32 near one-hot batch at scale 100", fp32_near_one_hot)
    report.run("float64 CUDA features under auto", float64_auto)


def check_numerics(report: Report, device: torch.device, sizes: Sizes) -> None:
    losses = ("clip", "siglip", "nt_xent", "memory_bank", "supcon", "distill")
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
                        got = _loss_and_grads(loss, a, b, scale, "triton")
                    worst[loss] = max(_relative_errors(got, expected).values())
                bound = TF32_RELATIVE if tf32 else KERNEL_RELATIVE[dtype]
                return {"status": "ok" if max(worst.values()) <= bound else "fail", "bound": bound,
                        **{k: f"{v:.2e}" for k, v in worst.items()}}

            name = f"numerics d={d} {str(dtype).replace('torch.', '')}{' tf32' if tf32 else ''} scale={scale:g}"
            report.run(name, check)


def check_int64_offsets(report: Report, device: torch.device, sizes: Sizes) -> None:
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

    report.run("int64 offsets past 2^31 elements", check)


def check_paths_and_determinism(report: Report, device: torch.device, sizes: Sizes) -> None:
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
        runs = [_loss_and_grads("clip", a, b, 14.3, "triton")[:4] for _ in range(2)]
        same = all(torch.equal(x, y) for x, y in zip(*runs))
        return {"status": "ok" if same else "fail", "bitwise_equal": same}

    report.run("single-pass vs two-pass forward", single_vs_two_pass)
    report.run("argmax ties", argmax_ties)
    report.run(f"bitwise determinism N={n} d={d}", determinism)


def check_binaries(report: Report, device: torch.device, table_path: Optional[str]) -> None:
    def check():
        from triton.runtime.jit import JITFunction

        from fastcontrast.kernels import engine

        kernels = [getattr(engine, name) for name in dir(engine) if name.endswith("_kernel")]
        launched = []
        for kernel in kernels:
            if not isinstance(kernel, JITFunction):
                continue
            for cache in kernel.device_caches.values():
                for compiled in cache[0].values():
                    compiled._init_handles()
                    launched.append({"kernel": kernel.fn.__name__, "registers": compiled.n_regs,
                                     "spills": compiled.n_spills})
        if not launched:
            return {"status": "skip", "reason": "no compiled binary (the interpreter runs no binaries)"}
        table = None
        if table_path and os.path.exists(table_path):
            with open(table_path) as f:
                table = json.load(f)
        arch = "sm_{}{}".format(*torch.cuda.get_device_capability(device))
        known = {}
        for row in (table or {}).get("rows", []):
            if row["arch"] == arch:
                known.setdefault(row["kernel"], set()).add(row["registers"])
        spilling = [b for b in launched if b["spills"]]
        unknown = [b for b in launched if known and b["registers"] not in known.get(b["kernel"], ())]
        return {"status": "fail" if spilling else "ok", "binaries": len(launched), "spilling": spilling,
                "registers_not_in_table": unknown[:10], "table": table_path if table else "not found"}

    report.run("launched binaries: registers and spills", check)


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


def check_performance(report: Report, device: torch.device, sizes: Sizes) -> None:
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
                    return fc.clip_loss(a, b, scale, backend="triton")

                def train(backend):
                    value = fc.clip_loss(a, b, scale, backend=backend)
                    torch.autograd.grad(value, [a, b, scale])

                forward_s = _time(lambda: forward().detach(), device)
                fused_s = _time(lambda: train("triton"), device)
                record = {"status": "ok", "n": n, "d": d, "forward_s": forward_s, "forward_backward_s": fused_s,
                          "forward_tflops": flops / forward_s / 1e12,
                          "backward_tflops": 3 * flops / max(fused_s - forward_s, 1e-9) / 1e12}
                try:
                    naive_s = _time(lambda: train("reference"), device, repeats=1)
                    record.update(naive_s=naive_s, speedup=naive_s / fused_s)
                except torch.OutOfMemoryError:
                    record.update(naive_s=None, naive="out of memory")
                return record

            report.run(f"performance CLIP bf16 N={n} d={d}", check)


def gpu_check(out_dir: Optional[str], budget_s: float, dry: bool, table_path: Optional[str]) -> int:
    """Run every check; returns the number of failed checks."""
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
    check_crash_scenarios(report, device, sizes)
    check_numerics(report, device, sizes)
    check_int64_offsets(report, device, sizes)
    check_paths_and_determinism(report, device, sizes)
    check_binaries(report, device, table_path)
    check_performance(report, device, sizes)
    print(f"{len(report.records) - 1} checks, {report.failed} failed"
          + (f"; JSON lines in {path}" if path else ""), flush=True)
    return report.failed


def gpu_check_cli(args) -> int:
    if args.dry and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        if "triton" in sys.modules:
            raise SystemExit("gpu-check --dry needs TRITON_INTERPRET=1 before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
    return 1 if gpu_check(args.out, args.budget, args.dry, args.table) else 0
