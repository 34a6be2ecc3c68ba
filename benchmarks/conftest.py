"""pytest-benchmark suite configuration: sizes, device, and the peak-memory summary.

Sizes come from ``--fastcontrast-size`` or the environment variable ``FASTCONTRAST_BENCH``:

- ``smoke``: tiny shapes, seconds; CI runs it (``make test``) so the suite cannot rot;
- ``default``: a few minutes on 2 CPU cores;
- ``large``: the big sweep, N up to 65536 on CPU and 1M on CUDA (hours on a CPU).

``FASTCONTRAST_BENCH_ROUNDS`` sets the timed rounds per case (default 3; 1 for ``large`` on CPU) and
``FASTCONTRAST_BENCH_DEVICE`` the device (default: cuda when available, else cpu).

Unlike ``tests/``, nothing here sets ``TRITON_INTERPRET``: the interpreter is for correctness, not speed,
so the Triton provider is skipped (with the reason) off CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastcontrast.tools.bench import (
    LOSSES,
    MODES,
    PROVIDERS,
    Case,
    MemoryMeter,
    Worker,
    format_bytes,
    warm_up_process,
)

SIZES = {
    # (N, d) points × dtypes.
    "smoke": {"cpu": ([(128, 32), (512, 64)], ["fp32"]), "cuda": ([(512, 64), (4096, 128)], ["bf16"])},
    "default": {
        "cpu": ([(1024, 64), (2048, 128), (4096, 256)], ["fp32", "bf16"]),
        "cuda": ([(n, d) for n in (4096, 16384, 65536) for d in (128, 512)], ["bf16", "fp16", "fp32"]),
    },
    "large": {
        "cpu": ([(n, d) for n in (4096, 16384, 65536) for d in (128, 512)], ["fp32", "bf16"]),
        "cuda": ([(n, d) for n in (16384, 65536, 262144, 1048576) for d in (128, 512, 1024)],
                 ["bf16", "fp16", "fp32"]),
    },
}


def pytest_addoption(parser):
    parser.addoption("--fastcontrast-size", choices=sorted(SIZES), default=None,
                     help="benchmark sizes (default: $FASTCONTRAST_BENCH or 'default')")


def bench_size(config) -> str:
    size = config.getoption("--fastcontrast-size") or os.environ.get("FASTCONTRAST_BENCH", "default")
    if size not in SIZES:
        raise pytest.UsageError(f"FASTCONTRAST_BENCH must be one of {', '.join(SIZES)}, got {size!r}")
    return size


def bench_device() -> str:
    return os.environ.get("FASTCONTRAST_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    device = bench_device()
    points, dtypes = SIZES[bench_size(metafunc.config)][torch.device(device).type]
    cases = [Case(loss, provider, n, d, dtype, mode, device)
             for loss in LOSSES for mode in MODES for dtype in dtypes for n, d in points
             for provider in PROVIDERS]
    metafunc.parametrize("case", cases, ids=[c.label() for c in cases])


def pytest_collection_modifyitems(config, items):
    if bench_size(config) == "large":
        for item in items:
            item.add_marker(pytest.mark.timeout(0))  # one large case can take longer than the suite's limit


class PeakMemory:
    """Peak extra memory of one call of a case.

    On CUDA, in this process (``max_memory_allocated`` after a reset). On CPU, in a memory worker
    subprocess (``fastcontrast.tools.bench.Runner``'s): VmHWM needs glibc's mmap threshold fixed from the
    process's start, which would slow the timed calls here (see ``fastcontrast/tools/bench/meters.py``).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.worker = None
        if device.type == "cuda":
            self.meter = MemoryMeter(device)
            warm_up_process(device)
            self.name, self.description = self.meter.name, self.meter.description
        else:
            self.worker = Worker(str(device), "memory")
            hello = self.worker.start()
            self.name, self.description = hello["memory_measure"], hello["memory_measure_description"]

    def __call__(self, case: Case, step) -> int:
        """Peak bytes; runs ``step`` here on CUDA, the case in the worker on CPU. Raises MemoryError on OOM."""
        if self.worker is None:
            return self.meter.measure(step)[1]
        row = self.worker.run(case, warmup=1, repeats=0, time_limit=None, budget=None)
        if row["status"] == "oom":
            raise MemoryError(row["reason"])
        if row["status"] != "ok":
            raise RuntimeError(f"memory worker: {row['status']}: {row['reason']}")
        step()  # the warm-up call of this process
        return row["peak_bytes"]

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()


@pytest.fixture(scope="session")
def peak_memory():
    probe = PeakMemory(torch.device(bench_device()))
    yield probe
    probe.close()


@pytest.fixture(scope="session")
def rounds(pytestconfig) -> int:
    if "FASTCONTRAST_BENCH_ROUNDS" in os.environ:
        return int(os.environ["FASTCONTRAST_BENCH_ROUNDS"])
    return 1 if bench_size(pytestconfig) == "large" and bench_device() == "cpu" else 3


_MEMORY_ROWS: list = []


@pytest.fixture
def record_memory():
    return _MEMORY_ROWS.append


def pytest_terminal_summary(terminalreporter, config):
    if not _MEMORY_ROWS or config.getoption("benchmark_disable", False):
        return
    terminalreporter.section("fastcontrast peak memory (extra over the inputs, see extra_info)")
    measures = sorted({row["memory_measure"] for row in _MEMORY_ROWS})
    terminalreporter.write_line(f"measure: {', '.join(measures)}")
    for row in _MEMORY_ROWS:
        terminalreporter.write_line(f"{row['name']:<60} {format_bytes(row['peak_bytes']):>12}")
