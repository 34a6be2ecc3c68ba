"""gpu-check's measurements: the performance probe, the work model for the same case, the ring's per-block
shapes and the largest batch that fits, each fused against the best naive loss.

Performance probe (the first minute after compiling): CLIP, SigLIP and NT-Xent at N = 65,536, d = 768, bf16,
forward + backward. Per loss: the median step time over CUDA events, ``torch.cuda.max_memory_allocated``,
each kernel's time from ``torch.profiler``, TFLOP/s of counted work and its share of the dense bf16 peak,
and the best naive loss (:func:`naive_best_step`) side by side at the same N or, where it does not fit,
N / 2 (else N / 4). Counted work: the work model's FLOPs when its record is in (:func:`model_records`, run in a CPU
subprocess beside the GPU sections), else the analytic count, :data:`ANALYTIC_PASSES` of 2·rows²·d (the work
model's count at these widths on sm_90: ``tests/kernels/test_work_model.py``); the record says which.

With ``--dry`` the same code runs at tiny shapes on the CPU, in triton's interpreter: its times are
meaningless, and it says so.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch

PROBE_LOSSES = ("CLIP", "SigLIP", "NT-Xent")
# GEMM passes of 2·rows²·d the work model counts for each probe loss at d = 768 on sm_90, rounded: CLIP's
# forward 1, dS 1, dS·B and dSᵀ·A 2; SigLIP's gradient in its forward; NT-Xent's symmetric 2N × 2N matrix over
# one block triangle (½ forward, ½ for G = dS + dSᵀ, 1 for G·Z). The analytic count used when the model's own
# record is not in.
ANALYTIC_PASSES = {"CLIP": 4.0, "SigLIP": 3.0, "NT-Xent": 2.0}
# Dense bf16 peaks by device name (vendor figures, no sparsity): what "% of peak" divides by.
DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12}
DRY_NOTE = "--dry: triton's interpreter on the CPU, times are meaningless"


def dense_peak(device_name: str) -> Optional[float]:
    for key, peak in DENSE_BF16_PEAK.items():
        if key in device_name:
            return peak
    return None


def rows(loss: str, n: int) -> int:
    """Rows of the similarity matrix: 2n for NT-Xent (both views), else n."""
    return 2 * n if loss == "NT-Xent" else n


def probe_inputs(n: int, d: int, device, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    b = torch.nn.functional.normalize(a + 0.5 * torch.randn(n, d, generator=g), dim=1)
    return (a.to(device=device, dtype=dtype).requires_grad_(), b.to(device=device, dtype=dtype).requires_grad_())


def fused_step(loss: str, a, b, backend: str):
    """One forward + backward of ``loss`` (CLIP scale 14.3; SigLIP scale 10, bias −10; NT-Xent τ = 0.1), as
    :func:`fastcontrast.tools.model._run_loss` runs it, with the constants on the inputs' device."""
    import fastcontrast as fc

    scale = torch.full((), 14.3 if loss == "CLIP" else 10.0, device=a.device, requires_grad=True)
    if loss == "CLIP":
        value = fc.clip_loss(a, b, scale, backend=backend)
    elif loss == "SigLIP":
        value = fc.siglip_loss(a, b, scale, torch.full((), -10.0, device=a.device, requires_grad=True),
                               backend=backend)
    else:
        value = fc.nt_xent_loss(a, b, 0.1, backend=backend)
    value.backward()
    return value.detach()


def naive_best_step(loss: str, a, b):
    """The best naive loss, :func:`fastcontrast.tools.model._run_naive_best`'s math with its constants on the
    inputs' device: one logits GEMM, softmax / CE in fp32, autograd's two gradient GEMMs (3 passes)."""
    import torch.nn.functional as F

    device = a.device
    if loss == "CLIP":
        scale = torch.full((), 14.3, device=device, requires_grad=True)
        logits = (scale * (a @ b.t())).float()
        labels = torch.arange(a.shape[0], device=device)
        value = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    elif loss == "SigLIP":
        scale = torch.full((), 10.0, device=device, requires_grad=True)
        bias = torch.full((), -10.0, device=device, requires_grad=True)
        logits = (scale * (a @ b.t()) + bias).float()
        labels = 2 * torch.eye(a.shape[0], device=device) - 1
        value = -F.logsigmoid(labels * logits).sum() / a.shape[0]
    else:
        z = F.normalize(torch.cat([a, b]), dim=1)
        n2 = z.shape[0]
        logits = (z @ z.t()).float() / 0.1
        logits = logits.masked_fill(torch.eye(n2, dtype=torch.bool, device=device), float("-inf"))
        value = F.cross_entropy(logits, torch.arange(n2, device=device).add(n2 // 2).remainder(n2))
    value.backward()
    return value.detach()


def _clear(*tensors) -> None:
    for t in tensors:
        t.grad = None


def time_steps(step: Callable[[], object], device, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls (CUDA events on a GPU, after one warm-up call that loads the
    binaries; wall clock elsewhere, where the interpreter has nothing to warm)."""
    if device.type == "cuda":
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            step()
            times.append(time.perf_counter() - begin)
    return times


def peak_bytes(step: Callable[[], object], device) -> Optional[int]:
    """``torch.cuda.max_memory_allocated`` over one call (inputs included); None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def kernel_times(step: Callable[[], object], device) -> dict:
    """{kernel name: {"ms": device time per call of the step, "launches": count}} from ``torch.profiler``,
    for the Triton kernels (names ending ``_kernel``) and the rest summed as ``other``; {} off CUDA."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize(device)
    out: dict = {}
    for event in prof.key_averages():
        total_us = getattr(event, "device_time_total", None)
        if total_us is None:
            total_us = getattr(event, "cuda_time_total", 0)
        if not total_us:
            continue
        name = event.key if event.key.endswith("_kernel") else "other"
        entry = out.setdefault(name, {"ms": 0.0, "launches": 0})
        entry["ms"] += total_us / 1e3
        entry["launches"] += event.count
    return {k: {"ms": round(v["ms"], 4), "launches": v["launches"]} for k, v in out.items()}


def measure(loss: str, n: int, d: int, device, provider: str, backend: str, repeats: int) -> dict:
    """Time, peak memory and (fused, CUDA) per-kernel times of one forward + backward; raises
    ``torch.OutOfMemoryError`` when it does not fit."""
    a, b = probe_inputs(n, d, device)

    def step():
        _clear(a, b)
        return fused_step(loss, a, b, backend) if provider == "fused" else naive_best_step(loss, a, b)

    times = time_steps(step, device, repeats)
    record = {"median_s": statistics.median(times), "times_s": [round(t, 6) for t in times],
              "peak_bytes": peak_bytes(step, device)}
    if provider == "fused":
        record["kernels"] = kernel_times(step, device)
    return record


def _free(device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def probe(loss: str, n: int, d: int, device, backend: str, repeats: int, device_name: str, dry: bool) -> dict:
    """The probe's record for one loss (module docstring), its work counted analytically (gpu-check puts in
    the work model's count when that record is in)."""
    fused = measure(loss, n, d, device, "fused", backend, repeats)
    _free(device)
    passes = ANALYTIC_PASSES[loss]
    flops = passes * 2 * rows(loss, n) ** 2 * d
    counted = f"analytic: {passes:g} GEMM passes of 2·rows²·d (the work model's count at d = 768, sm_90)"
    peak = dense_peak(device_name)
    tflops = flops / fused["median_s"] / 1e12
    record = {"status": "ok", "loss": loss, "n": n, "d": d, "dtype": "bf16", "backend": backend,
              "median_s": fused["median_s"], "times_s": fused["times_s"], "peak_bytes": fused["peak_bytes"],
              "kernels": fused["kernels"], "flops": flops, "flops_counted": counted, "tflops": tflops,
              "percent_of_dense_peak": None if peak is None else 100 * tflops * 1e12 / peak,
              # What `python -m fastcontrast model --calibrate` reads: seconds per step of each Triton kernel.
              "kernel_times_s": {k: v["ms"] / 1e3 for k, v in fused["kernels"].items() if k != "other"}}
    naive_n, naive = n, None
    while naive_n >= n // 4:
        naive = _unless_out_of_memory(lambda m=naive_n: measure(loss, m, d, device, "naive", backend,
                                                                 max(1, repeats // 2)), device)
        if naive is not None:
            break
        naive_n //= 2
    if naive is None:
        record.update(naive_n=None, naive="out of memory at N / 4")
    else:
        record.update(naive_n=naive_n, naive_median_s=naive["median_s"], naive_peak_bytes=naive["peak_bytes"])
        if naive_n == n:
            record["speedup_over_naive"] = naive["median_s"] / fused["median_s"]
            record["naive_best_s"] = naive["median_s"]  # the model's calibration takes it at the same N only
    if dry:
        record["note"] = DRY_NOTE
    return record


def model_records(loss: str, n: int, d: int) -> dict:
    """The work model's prediction for one probe case (needs ``TRITON_INTERPRET=1``): totals and per kernel,
    on the H100 and the H200, and the best naive loss's modelled time."""
    from fastcontrast.tools import model

    launches, torch_ops = model.count_loss(loss, d, n)
    out = {"loss": loss, "n": n, "d": d, "gpus": {}}
    for name, gpu in model.GPUS.items():
        kernels, total = model.time_loss(loss, d, n, launches, torch_ops, gpu)
        naive = model.naive_model(loss, d, n, gpu, best=True)
        out["gpus"][name] = {"modelled_s": total["modelled_s"], "passes": total["passes"],
                             "naive_best_s": naive["naive_s"],
                             "kernels": {k.kernel: {"modelled_s": k.modelled_s, "flops": k.flops,
                                                    "launches": k.launches} for k in kernels}}
    out["flops"] = total["flops"]
    return out


def pick_model(records: list[dict], loss: str, n: int, d: int, device_name: str) -> Optional[dict]:
    """The model record for (loss, n, d) from the JSONL's ``model`` records, on the device's GPU (H200 for an
    H200, else the H100): {"modelled_s", "flops", "kernels", "naive_best_s", "gpu", "n", "d"} or None."""
    gpu = "H200" if "H200" in device_name else "H100"
    for r in records:
        if r.get("check", "").startswith("model ") and r.get("loss") == loss and r.get("n") == n and r.get("d") == d:
            if r.get("status") != "info" or gpu not in r.get("gpus", {}):
                continue
            return {**r["gpus"][gpu], "flops": r["flops"], "gpu": gpu, "n": n, "d": d}
    return None


def ring_rank_step(rows_i, rows_t, image, text, scale, engine, world: int) -> None:
    """One rank's forward + backward of CLIP's ring (local-loss form) with its ``B`` rows of each tower,
    against the other tower in ``world`` blocks of B rows, exactly the engine calls
    :class:`fastcontrast.ring.RingLogSumExp` makes per block (home block with the positives); ``world = 1``
    is the same work as one rectangular call."""
    n_local = rows_i.shape[0]
    blocks = [(image[k * n_local:(k + 1) * n_local], text[k * n_local:(k + 1) * n_local]) for k in range(world)]
    positives = torch.arange(n_local, device=rows_i.device)
    directions = ((rows_i, 1), (rows_t, 0))  # image rows against text blocks, text rows against image blocks
    lses = []
    for local, travel in directions:
        parts, positive = [], None
        for k, block in enumerate(blocks):
            lse, _, pos, *_ = engine.lse_forward(
                local, block[travel], scale, positives if k == 0 else None, need_row=True, need_col=False,
                exclude_offset=None, exclude_positive=False, private_columns=0, need_argmax=False)
            parts.append(lse)
            positive = pos if k == 0 else positive
        lses.append(torch.logsumexp(torch.stack(parts), dim=0))
    grad_row = torch.full((n_local,), 0.5 / n_local, device=rows_i.device)
    grad_pos = -grad_row
    for (local, travel), lse in zip(directions, lses):
        for k, block in enumerate(blocks):
            home = k == 0
            engine.lse_backward(local, block[travel], scale, positives if home else None, lse, lse.new_empty(0),
                                grad_row, None, grad_pos if home else None, exclude_offset=None,
                                exclude_positive=False, private_columns=0, need_a=True, need_b=True)


def ring_timing(n: int, d: int, world: int, device, backend: str, repeats: int) -> dict:
    """The ring's per-block shapes (B = n / world rows against blocks of B) timed in one process, against the
    same work as one rectangular call per direction."""
    from fastcontrast._dispatch import resolve_engine

    engine = resolve_engine(backend, device, torch.bfloat16)
    image, text = (t.detach() for t in probe_inputs(n, d, device))
    b = n // world
    scale = torch.full((), 14.3, device=device)
    ring_s = statistics.median(time_steps(lambda: ring_rank_step(image[:b], text[:b], image, text, scale, engine,
                                                                 world), device, repeats))
    one_s = statistics.median(time_steps(lambda: ring_rank_step(image[:b], text[:b], image, text, scale, engine, 1),
                                         device, repeats))
    return {"n": n, "d": d, "world": world, "block_rows": b, "ring_rank_s": ring_s, "one_call_s": one_s,
            "ring_over_one_call": ring_s / one_s}


def largest_n(fits: Callable[[int], bool], start: int, limit: int) -> Optional[int]:
    """The largest N (a multiple of ``start``'s power-of-two steps, bisected between the last doubling that
    fit and the first that did not) with ``fits(N)``; None when ``start`` does not fit."""
    if not fits(start):
        return None
    low, high = start, None
    while high is None and low * 2 <= limit:
        if fits(low * 2):
            low *= 2
        else:
            high = low * 2
    if high is None:
        return low
    for _ in range(3):  # to within an eighth of the doubling
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def _unless_out_of_memory(fn: Callable[[], object], device):
    """``fn()``, or None when it runs out of device memory; the memory is freed either way. (Freed after the
    ``except`` block: while it runs, the exception's traceback keeps the failed call's tensors alive.)"""
    result, out_of_memory = None, False
    try:
        result = fn()
    except torch.OutOfMemoryError:
        out_of_memory = True
    _free(device)
    return None if out_of_memory else result


def step_peak(loss: str, n: int, d: int, device, provider: str, backend: str) -> Optional[int]:
    """Peak bytes allocated by one forward + backward (inputs included) after a warm-up, or None when it does
    not fit (CUDA only)."""
    def run():
        a, b = probe_inputs(n, d, device)

        def step():
            _clear(a, b)
            return fused_step(loss, a, b, backend) if provider == "fused" else naive_best_step(loss, a, b)

        step()
        return peak_bytes(step, device)

    return _unless_out_of_memory(run, device)


def max_n(loss: str, d: int, device, backend: str, budget_bytes: float, n: int, start: int, limit: int) -> dict:
    """The largest N whose forward + backward fits in ``budget_bytes``, fused and naive.

    Fused: peaks measured at ``n`` and ``2n`` and extrapolated linearly (its memory is O(N·d); running it at
    that N would take minutes of compute, its time being O(N²)); the peak at ``4n`` checks the line.
    Naive: found by running it (doubling from ``start``, then bisecting), its memory being O(N²)."""
    peaks = {m: step_peak(loss, m, d, device, "fused", backend) for m in (n, 2 * n, 4 * n)}
    record: dict = {"fused_peak_bytes": {str(m): p for m, p in peaks.items()}}
    if peaks[n] is None or peaks[2 * n] is None or peaks[2 * n] <= peaks[n]:
        record["fused_largest_n"] = None
    else:
        per_row = (peaks[2 * n] - peaks[n]) / n
        record.update(fused_bytes_per_row=per_row,
                      fused_largest_n=int(n + (budget_bytes - peaks[n]) // per_row),
                      fused_how="extrapolated linearly from the peaks at N and 2N (O(N·d) memory)")
        if peaks[4 * n] is not None:  # the line's check: its prediction at 4N against the peak measured there
            predicted = peaks[n] + per_row * 3 * n
            record["fused_peak_4n_over_linear"] = peaks[4 * n] / predicted
    naive_peaks: dict = {}

    def fits(m: int) -> bool:
        naive_peaks[m] = step_peak(loss, m, d, device, "naive", backend)
        return naive_peaks[m] is not None

    largest = largest_n(fits, start, limit)
    record.update(naive_largest_n=largest, naive_peak_bytes=naive_peaks.get(largest),
                  naive_how="run at each N tried (doubling, then bisecting)",
                  naive_tried={str(m): p for m, p in sorted(naive_peaks.items())})
    if largest and record.get("fused_largest_n"):
        record["fused_over_naive_n"] = record["fused_largest_n"] / largest
    return record
