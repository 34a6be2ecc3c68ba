"""Benchmark tooling (docs/benchmarks.md): cases, memory meters, worker subprocesses, the largest-N search, reports.

``python -m fastcontrast bench`` is :func:`fastcontrast.tools.bench.cli.bench_cli`; ``benchmarks/`` uses the
names below.
"""

from fastcontrast.tools.bench.cases import (
    DTYPES,
    FLOPS_FORMULA,
    GIB,
    LOSSES,
    MIB,
    MODES,
    PROVIDER_LABELS,
    PROVIDERS,
    Case,
    environment,
    format_bytes,
    format_flops,
    format_seconds,
    free_memory,
    input_bytes,
    make_inputs,
    make_step,
    model_flops,
    parse_bytes,
    provider_unavailable,
)
from fastcontrast.tools.bench.meters import MEASURES, MemoryMeter, is_out_of_memory
from fastcontrast.tools.bench.report import format_results_table, load_average, now_utc, plot_results
from fastcontrast.tools.bench.search import largest_n
from fastcontrast.tools.bench.worker import Runner, Worker, empty_row, run_case, warm_up_process

__all__ = [
    "DTYPES", "FLOPS_FORMULA", "GIB", "LOSSES", "MEASURES", "MIB", "MODES", "PROVIDERS", "PROVIDER_LABELS", "Case",
    "MemoryMeter", "Runner", "Worker", "empty_row", "environment", "format_bytes", "format_flops",
    "format_results_table", "format_seconds", "free_memory", "input_bytes", "is_out_of_memory", "largest_n",
    "load_average", "make_inputs", "make_step", "model_flops", "now_utc", "parse_bytes", "plot_results",
    "provider_unavailable", "run_case", "warm_up_process",
]
