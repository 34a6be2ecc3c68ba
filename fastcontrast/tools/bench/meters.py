"""Peak memory of one call, and the memory budget a benchmark step runs under (docs/benchmarks.md).

Peak memory is the peak *extra* memory of one call over what was in use just before it (the inputs live),
measured by one of (:class:`MemoryMeter`):

- ``cuda_max_memory_allocated``: ``max_memory_allocated`` after ``reset_peak_memory_stats``.
- ``cpu_vmhwm`` (Linux): the growth of a worker process's peak resident set, ``VmHWM``, over ``VmRSS``,
  after resetting VmHWM by writing 5 to ``/proc/self/clear_refs``. This is the memory that gets a CPU job
  OOM-killed, so it counts everything the call makes resident: tensors, oneDNN/MKL workspaces, allocator
  overhead. For freed tensors to leave the resident set at all, that worker starts with glibc's mmap
  threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``): by default glibc raises the threshold to the
  size of the last freed block (up to 32 MiB) and keeps such blocks in a heap that stays resident, so a
  chunk freed by one call is reused silently by the next and the peak is under-counted. That setting
  costs fresh page faults on every large allocation (about 30 % of the blockwise engine's time on CPU),
  so times come from a second worker with glibc's defaults, the steady state of a training process.
  The two cannot share a process: once the heap holds large free blocks, glibc serves even
  above-threshold requests from them.
- ``tensor_bytes`` (any OS, the fallback where VmHWM cannot be reset, e.g. macOS): bytes of tensor storage
  alive at once, counted op by op by a ``TorchDispatchMode``. It sees every tensor an aten op returns, but
  neither library workspaces nor what is made and freed inside a custom op: the engines' chunk workspaces
  inside ``fastcontrast::*`` (at most ``chunk_bytes`` each) are not counted, where CUDA's counter would.
"""

from __future__ import annotations

import ctypes
import gc
import sys
from typing import Any, Callable, Optional

import torch

from fastcontrast.tools.bench.cases import MIB


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_vmhwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def pin_malloc_mmap_threshold(threshold: int = 64 * 2**10) -> bool:
    """Make glibc serve every block ≥ ``threshold`` by mmap and unmap it on free (see module docstring).

    The memory worker is started with the same setting in its environment, so that it holds from the first
    allocation on; this call is for a process that was not.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold, m_trim_threshold = -3, -1
        return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(libc.mallopt(m_trim_threshold, 2 * threshold))
    except (OSError, AttributeError):
        return False


def _vmhwm_works() -> bool:
    """True if VmHWM can be reset here and tracks a freed 32 MiB tensor (glibc pinned, /proc writable)."""
    try:
        probe = torch.ones(8 * MIB)  # 32 MiB, touched
        del probe
        gc.collect()
        _reset_vmhwm()
        base = _proc_status_bytes("VmRSS")
        probe = torch.ones(8 * MIB)
        del probe
        grown = _proc_status_bytes("VmHWM") - base
        _reset_vmhwm()
        after = _proc_status_bytes("VmHWM") - _proc_status_bytes("VmRSS")
    except (OSError, KeyError, ValueError):
        return False
    return 24 * MIB <= grown <= 48 * MIB and after <= 8 * MIB


class _LiveTensorBytes:
    """Counts bytes of tensor storage created inside the block and alive at once (a TorchDispatchMode)."""

    def __init__(self):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        meter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                # Storages an op reads that we never saw being made existed before the block (the inputs):
                # remember them, so that views of them (a[start:stop]) are not counted as new memory.
                for t in tree_leaves((args, kwargs)):
                    if isinstance(t, torch.Tensor):
                        ref = StorageWeakRef(t.untyped_storage())
                        if ref.cdata not in meter.live:
                            meter.preexisting[ref.cdata] = ref
                out = func(*args, **(kwargs or {}))
                meter.prune()
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        storage = t.untyped_storage()
                        ref = StorageWeakRef(storage)
                        if ref.cdata not in meter.live and ref.cdata not in meter.preexisting:
                            meter.live[ref.cdata] = (ref, storage.nbytes())
                            meter.current += storage.nbytes()
                meter.peak = max(meter.peak, meter.current)
                return out

        self.mode = Mode()
        self.live: dict[int, tuple[Any, int]] = {}
        self.preexisting: dict[int, Any] = {}
        self.current = 0
        self.peak = 0

    def prune(self) -> None:
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes
        for key, ref in list(self.preexisting.items()):
            if ref.expired():
                del self.preexisting[key]


MEASURES = {
    "cuda_max_memory_allocated": "CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), "
    "minus memory_allocated() before the call",
    "cpu_vmhwm": "CPU: growth of the process's peak resident set (VmHWM, reset via /proc/self/clear_refs) "
    "over VmRSS before the call, in a worker whose glibc mmap threshold is fixed at 64 KiB so freed tensors "
    "leave the resident set (times come from a worker with glibc's defaults)",
    "tensor_bytes": "bytes of tensor storage created during the call and alive at once, counted by a "
    "TorchDispatchMode (no library workspaces)",
}


class MemoryMeter:
    """Peak extra memory of one call on ``device``; ``name`` says which measure (see :data:`MEASURES`)."""

    def __init__(self, device: torch.device, prefer: Optional[str] = None):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.name = "cuda_max_memory_allocated"
        elif prefer == "tensor_bytes":
            self.name = "tensor_bytes"
        else:
            pinned = pin_malloc_mmap_threshold()
            self.name = "cpu_vmhwm" if pinned and _vmhwm_works() else "tensor_bytes"
        self.description = MEASURES[self.name]

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, int]:
        """Run ``fn`` once; returns (its result, peak extra bytes)."""
        if self.name == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            result = fn()
            torch.cuda.synchronize(self.device)
            return result, torch.cuda.max_memory_allocated(self.device) - before
        if self.name == "cpu_vmhwm":
            gc.collect()
            _reset_vmhwm()
            before = _proc_status_bytes("VmRSS")
            result = fn()
            return result, max(0, _proc_status_bytes("VmHWM") - before)
        meter = _LiveTensorBytes()
        with meter.mode:
            result = fn()
        return result, meter.peak

def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return any(marker in text.lower() for marker in ("can't allocate memory", "cannot allocate memory",
                                                      "out of memory"))

class _Budget:
    """Makes allocations past ``budget`` bytes (from now) fail cleanly instead of killing the machine.

    CPU (Linux): the soft RLIMIT_AS is set to the current address-space size plus the budget, so a tensor
    allocation beyond it fails with torch's "can't allocate memory" RuntimeError. Address space is at least
    the resident memory, so this never lets a step take more RAM than the budget. CUDA: the caching
    allocator's per-process fraction. Elsewhere nothing is enforced (``hard`` is False) and callers stop on
    the measured peak instead.
    """

    def __init__(self, device: torch.device, budget: Optional[int]):
        self.device, self.budget, self.hard, self._restore = torch.device(device), budget, False, None

    def __enter__(self):
        if self.budget is None:
            return self
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            used = torch.cuda.memory_reserved(self.device)
            torch.cuda.set_per_process_memory_fraction(min(1.0, (used + self.budget) / total), self.device)
            self._restore = "cuda"
            self.hard = True
            return self
        if not sys.platform.startswith("linux"):
            return self  # macOS accepts RLIMIT_AS but does not enforce it
        try:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            limit = _proc_status_bytes("VmSize") + self.budget
            if hard != resource.RLIM_INFINITY:
                limit = min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
            self._restore = (soft, hard)
            self.hard = True
        except (ImportError, OSError, KeyError, ValueError):
            pass
        return self

    def __exit__(self, *exc):
        if self._restore == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
        elif self._restore is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, self._restore)
        return False
