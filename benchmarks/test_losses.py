"""Speed and peak memory of CLIP, SigLIP and NT-Xent: naive reference vs blockwise torch vs Triton.

    pytest benchmarks --benchmark-only                      # default sizes (minutes on 2 CPU cores)
    FASTCONTRAST_BENCH=large pytest benchmarks --benchmark-only
    FASTCONTRAST_BENCH=smoke pytest benchmarks --benchmark-disable   # CI smoke run

Each case first runs once to measure peak memory (on CPU in a memory worker subprocess, see
``benchmarks/conftest.py``; the warm-up call here), then is timed by pytest-benchmark. ``extra_info``
carries the peak memory and which measure it is, the model FLOPs (the same count for every provider) and
the achieved rate, the device and the versions. Nothing here asserts a timing; cases that would not fit
in memory are skipped with the estimate.
"""

from __future__ import annotations

import pytest
import torch

from fastcontrast.tools.bench import (
    DTYPES,
    FLOPS_FORMULA,
    Case,
    environment,
    format_bytes,
    free_memory,
    input_bytes,
    is_out_of_memory,
    make_inputs,
    make_step,
    model_flops,
    provider_unavailable,
)

# Peak extra memory of the naive losses in units of one N×N matrix in the input dtype, measured on CPU
# (N = 2048, forward+backward: CLIP 4.7, SigLIP 5.2, NT-Xent 13) and rounded up for safety; MNRL (N × 2N logits,
# not measured here) is given CLIP's count for its two N×N halves, doubled for safety.
NAIVE_MATRIX_FACTOR = {"clip": 6, "siglip": 6, "nt_xent": 14, "mnrl": 12}
# Keep a margin for the rest of the machine (and the other processes on it).
FIT_FRACTION = 0.7


def estimated_peak_bytes(case: Case) -> int:
    itemsize = torch.finfo(DTYPES[case.dtype]).bits // 8
    features = 2 * case.n * case.d * itemsize
    if case.provider == "reference":
        return NAIVE_MATRIX_FACTOR[case.loss] * case.n * case.n * itemsize + 3 * features
    # Blockwise: inputs, their gradients and fp32 copies, plus a few chunks of logits.
    return 8 * case.n * case.d * 4 + 4 * 32 * 2**20


def test_loss(benchmark, case: Case, peak_memory, rounds, record_memory):
    reason = provider_unavailable(case.provider, torch.device(case.device))
    if reason is not None:
        pytest.skip(reason)
    free, _ = free_memory(torch.device(case.device))
    needed = estimated_peak_bytes(case)
    if needed > FIT_FRACTION * free:
        pytest.skip(f"would not fit: needs about {format_bytes(needed)}, {format_bytes(free)} free")

    benchmark.group = f"{case.loss} {case.mode} N={case.n} d={case.d} {case.dtype}"
    inputs = make_inputs(case)
    step = make_step(case, inputs)
    try:
        peak = peak_memory(case, step)  # also this process's warm-up call
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        pytest.skip(f"out of memory (estimated {format_bytes(needed)}, {format_bytes(free)} free)")
    flops = model_flops(case.loss, case.n, case.d, case.mode)
    benchmark.extra_info.update({
        "loss": case.loss, "provider": case.provider, "mode": case.mode, "n": case.n, "d": case.d,
        "dtype": case.dtype,
        "peak_memory_bytes": peak, "memory_measure": peak_memory.name,
        "memory_measure_description": peak_memory.description,
        "input_bytes": input_bytes(inputs),
        "model_flops": flops, "flops_formula": FLOPS_FORMULA,
        **environment(torch.device(case.device)),
    })
    record_memory({"name": case.label(), "peak_bytes": peak, "memory_measure": peak_memory.name})

    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)

    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        benchmark.extra_info["median_s"] = median
        benchmark.extra_info["achieved_model_flops_per_s"] = flops / median if median > 0 else None
