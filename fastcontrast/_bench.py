"""Benchmark machinery shared by ``python -m fastcontrast bench`` and the pytest-benchmark suite (DESIGN §7).

One *case* is (loss, provider, N, d, dtype, mode, device). Providers are the naive reference
(``backend="reference"``: open_clip's / lightly's math with the full logits), the blockwise torch engine
(``backend="torch"``) and the Triton engine (``backend="triton"``, CUDA only). Modes are ``forward`` (the
loss with inputs that require grad, as in training, output dropped) and ``forward+backward`` (the loss and
``torch.autograd.grad`` of it with respect to every input: features, scale and bias).

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
  alive at once, counted op by op by a ``TorchDispatchMode``. It sees every tensor but no library
  workspace, like CUDA's counter.

FLOPs are *model* FLOPs: the GEMM work of the naive loss, the same number for every provider, so that
achieved FLOP/s compare providers on equal terms (a provider that does less or more work shows it as a
higher or lower rate). See :func:`model_flops`.

The CLI runs every case in a worker subprocess (:class:`Worker`): it keeps the parent's memory clean,
enforces the memory budget, and lets a call that runs past the time limit be killed.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import itertools
import json
import os
import platform
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch

LOSSES = ("clip", "siglip", "nt_xent")
PROVIDERS = ("reference", "torch", "triton")
PROVIDER_LABELS = {"reference": "naive", "torch": "blockwise torch", "triton": "triton"}
MODES = ("forward", "forward+backward")
MODE_ALIASES = {"fwd": "forward", "forward": "forward", "fwd+bwd": "forward+backward",
                "forward+backward": "forward+backward", "train": "forward+backward"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}

# Logits matrices of n×m the naive loss computes: open_clip's ClipLoss builds logits_per_image and
# logits_per_text (2 matrices); SigLipLoss one; lightly's NTXentLoss the four n×n blocks 00, 01, 10, 11
# (one (2n)×(2n) matrix).
NAIVE_MATRICES = {"clip": 2, "siglip": 1, "nt_xent": 4}
FLOPS_FORMULA = (
    "model FLOPs = passes × matrices × 2·N·N·d, the naive loss's GEMM work: passes = 1 (forward) or 3 "
    "(forward+backward: the logits GEMM and the two gradient GEMMs); matrices = 2 for CLIP (logits_per_image "
    "and logits_per_text), 1 for SigLIP, 4 for NT-Xent (lightly's four N×N blocks); N = batch size. "
    "Elementwise work is not counted. The same count is used for every provider."
)

# Scales as at initialisation: open_clip's logit_scale = exp(log(1/0.07)), SigLIP's t' = log 10, b = −10,
# lightly's default temperature.
CLIP_SCALE = 1 / 0.07
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0
NT_XENT_TEMPERATURE = 0.5

MIB = 2**20
GIB = 2**30


def model_flops(loss: str, n: int, d: int, mode: str) -> int:
    """Model FLOPs of one call, see :data:`FLOPS_FORMULA`."""
    passes = 3 if mode == "forward+backward" else 1
    return passes * NAIVE_MATRICES[loss] * 2 * n * n * d


def parse_mode(mode: str) -> str:
    if mode not in MODE_ALIASES:
        raise ValueError(f"mode must be one of {', '.join(MODE_ALIASES)}, got {mode!r}.")
    return MODE_ALIASES[mode]


_BYTE_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
               "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}


def parse_bytes(text: str) -> int:
    """``"8GiB"``, ``"512M"``, ``"1.5g"``, ``"1000000"`` → bytes (K, M, G are binary; KB, MB, GB decimal)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if match is None or match.group(2).lower() not in _BYTE_UNITS:
        raise ValueError(f"cannot read {text!r} as a size: use e.g. 8GiB, 512MiB, 2G or a number of bytes.")
    return int(float(match.group(1)) * _BYTE_UNITS[match.group(2).lower()])


def format_bytes(n: Optional[float]) -> str:
    if n is None:
        return "—"
    if abs(n) >= GIB:
        return f"{n / GIB:.2f} GiB"
    if abs(n) >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / 2**10:.0f} KiB"


def format_flops(rate: Optional[float]) -> str:
    if not rate:
        return "—"
    for unit, scale in (("PFLOP/s", 1e15), ("TFLOP/s", 1e12), ("GFLOP/s", 1e9)):
        if rate >= scale:
            return f"{rate / scale:.1f} {unit}"
    return f"{rate / 1e6:.1f} MFLOP/s"


def format_seconds(t: Optional[float]) -> str:
    if t is None:
        return "—"
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.1f} ms"
    return f"{t * 1e6:.0f} µs"


# --------------------------------------------------------------------------------------------- memory


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


# ----------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One benchmark configuration. ``n`` is the batch size (rows of each input)."""

    loss: str
    provider: str
    n: int
    d: int
    dtype: str = "fp32"
    mode: str = "forward+backward"
    device: str = "cpu"
    chunk_bytes: Optional[int] = None

    def label(self) -> str:
        return f"{self.loss}-{self.mode}-{self.provider}-N{self.n}-d{self.d}-{self.dtype}"


def provider_unavailable(provider: str, device: torch.device) -> Optional[str]:
    """None if ``provider`` can be benchmarked on ``device``, else the reason it is skipped."""
    if provider not in PROVIDERS:
        return f"unknown provider {provider!r} (choose from {', '.join(PROVIDERS)})"
    if provider != "triton":
        return None
    if torch.device(device).type != "cuda":
        return "the Triton engine needs CUDA (its CPU interpreter is for correctness checks, not speed)"
    from fastcontrast._dispatch import triton_import_error

    error = triton_import_error()
    return None if error is None else f"triton does not import: {error}"


def make_inputs(case: Case, seed: int = 0) -> dict:
    """The loss's inputs for ``case``: features [n, d] in the case's dtype (leaves that require grad), scale
    and bias (fp32 0-dim, require grad) where the loss has them."""
    device = torch.device(case.device)
    dtype = DTYPES[case.dtype]
    gen = torch.Generator(device=device).manual_seed(seed)

    def features(normalise: bool) -> torch.Tensor:
        x = torch.randn(case.n, case.d, generator=gen, device=device, dtype=torch.float32)
        if normalise:  # open_clip's models normalise their features before the loss
            x = torch.nn.functional.normalize(x, dim=1)
        return x.to(dtype).requires_grad_(True)

    def scalar(value: float) -> torch.Tensor:
        return torch.tensor(value, device=device, dtype=torch.float32, requires_grad=True)

    if case.loss == "clip":
        return {"a": features(True), "b": features(True), "scale": scalar(CLIP_SCALE), "bias": None}
    if case.loss == "siglip":
        return {"a": features(True), "b": features(True), "scale": scalar(SIGLIP_SCALE),
                "bias": scalar(SIGLIP_BIAS)}
    if case.loss == "nt_xent":
        return {"a": features(False), "b": features(False), "scale": None, "bias": None}
    raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {case.loss!r}.")


def input_bytes(inputs: dict) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))


def make_step(case: Case, inputs: dict) -> Callable[[], Any]:
    """A closure running one call of ``case`` (loss, plus its gradients for ``forward+backward``).

    On CUDA it synchronises before returning, so that wall-clock timers measure the work.
    """
    from fastcontrast import functional

    kwargs: dict = {"backend": case.provider}
    if case.provider == "torch" and case.chunk_bytes is not None:
        kwargs["chunk_bytes"] = case.chunk_bytes
    a, b, scale, bias = inputs["a"], inputs["b"], inputs["scale"], inputs["bias"]
    if case.loss == "clip":
        def loss_fn():
            return functional.clip_loss(a, b, scale, **kwargs)
    elif case.loss == "siglip":
        def loss_fn():
            return functional.siglip_loss(a, b, scale, bias, **kwargs)
    else:
        def loss_fn():
            return functional.nt_xent_loss(a, b, NT_XENT_TEMPERATURE, **kwargs)
    wrt = [t for t in (a, b, scale, bias) if t is not None]
    sync = torch.cuda.synchronize if torch.device(case.device).type == "cuda" else (lambda: None)

    if case.mode == "forward":
        def step():
            loss = loss_fn().detach()
            sync()
            return loss
    else:
        def step():
            grads = torch.autograd.grad(loss_fn(), wrt)
            sync()
            return grads
    return step


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads) [CPU]"


def package_version(name: str) -> Optional[str]:
    """Installed version of a distribution, without importing it (importing triton is slow)."""
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def environment(device: torch.device) -> dict:
    """Device and versions recorded with every result."""
    import fastcontrast

    device = torch.device(device)
    env = {
        "device": str(device),
        "device_name": device_name(device),
        "fastcontrast": fastcontrast.__version__,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return env


def free_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of ``device``; on CPU, MemAvailable and MemTotal (or best effort elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                info[key] = int(value.split()[0]) * 1024
        return info["MemAvailable"], info["MemTotal"]
    except (OSError, KeyError, ValueError):
        pass
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 * GIB
    return total // 2, total


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return any(marker in text.lower() for marker in ("can't allocate memory", "cannot allocate memory",
                                                      "out of memory"))


# ----------------------------------------------------------------------------------- running one case


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


def empty_row(case: Case, status: str = "ok", reason: Optional[str] = None, measure: str = "") -> dict:
    """A result row for ``case`` with no measurement yet (see :func:`run_case` for the fields)."""
    return {**asdict(case), "status": status, "reason": reason, "time_s": None, "times_s": [],
            "peak_bytes": None, "input_bytes": None, "total_bytes": None, "memory_measure": measure,
            "flops": model_flops(case.loss, case.n, case.d, case.mode), "flops_per_s": None}


def run_case(
    case: Case,
    meter: Optional[MemoryMeter],
    *,
    warmup: int = 1,
    repeats: int = 3,
    time_limit: Optional[float] = None,
    budget: Optional[int] = None,
    on_event: Optional[Callable[[dict], None]] = None,
) -> dict:
    """Measure one case in this process.

    The first warm-up call is also the memory-measured call (unless ``meter`` is None) and the time-limit
    probe; with ``warmup=0`` the first timed call is measured instead. ``repeats`` timed calls follow. A
    call slower than ``time_limit`` ends the case as ``time-limited``; an allocation past ``budget``
    (bytes, inputs included) as ``oom``.

    Returns:
        A JSON-able dict: the case's fields, ``status`` (ok | oom | time-limited | error | skipped),
        ``reason``, ``time_s`` (median of the timed calls, or the one call), ``times_s``, ``peak_bytes``
        (peak extra memory), ``input_bytes``, ``total_bytes`` (inputs + peak), ``memory_measure``,
        ``flops`` (model), ``flops_per_s``.
    """
    emit = on_event or (lambda event: None)
    result = empty_row(case, measure=meter.name if meter is not None else "")
    skip = provider_unavailable(case.provider, torch.device(case.device))
    if skip is not None:
        result.update(status="skipped", reason=skip)
        return result
    inputs = step = None
    budget_guard = _Budget(torch.device(case.device), budget)
    try:
        with budget_guard:
            inputs = make_inputs(case)
            result["input_bytes"] = input_bytes(inputs)
            step = make_step(case, inputs)
            emit({"event": "ready"})
            calls = max(1, warmup + repeats)
            first = None
            for index in range(calls):
                start = time.perf_counter()
                if index == 0 and meter is not None:
                    out, peak = meter.measure(step)
                    result["peak_bytes"] = int(peak)
                    result["total_bytes"] = int(peak) + result["input_bytes"]
                else:
                    out = step()
                elapsed = time.perf_counter() - start
                del out
                first = elapsed if first is None else first
                if index >= warmup:
                    result["times_s"].append(elapsed)
                emit({"event": "call", "index": index, "calls": calls, "seconds": elapsed})
                if time_limit is not None and elapsed > time_limit:
                    result.update(status="time-limited",
                                  reason=f"one call took {elapsed:.1f} s > time limit {time_limit:g} s")
                    break
            if not result["times_s"]:
                # No timed repeat (repeats=0, or the warm-up call hit the limit): report the first call.
                result["times_s"].append(first)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row in the table
        if is_out_of_memory(exc):
            limit = f" within the {format_bytes(budget)} budget" if budget is not None else ""
            asked = re.search(r"tried to allocate ([0-9.]+ ?[GMK]i?B|\d+ bytes)", str(exc), re.IGNORECASE)
            detail = f": an allocation of {asked.group(1)} failed" if asked else ""
            if asked and asked.group(1).endswith(" bytes"):
                detail = f": an allocation of {format_bytes(int(asked.group(1).split()[0]))} failed"
            result.update(status="oom", reason=f"out of memory{limit}{detail}")
        else:
            result.update(status="error", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    finally:
        del inputs, step
        gc.collect()
        if torch.device(case.device).type == "cuda":
            torch.cuda.empty_cache()
    if result["times_s"]:
        result["time_s"] = statistics.median(result["times_s"])
        if result["status"] == "ok":
            result["flops_per_s"] = result["flops"] / result["time_s"]
    if (result["status"] == "ok" and budget is not None and result["total_bytes"] is not None
            and result["total_bytes"] > budget):
        result.update(status="oom", reason=f"measured peak {format_bytes(result['total_bytes'])} is over the "
                      f"budget {format_bytes(budget)}")
    return result


def warm_up_process(device: torch.device) -> None:
    """Run every loss once at a tiny size, so one-time allocations (thread pools, oneDNN) are not charged
    to the first measured case."""
    for loss in LOSSES:
        for provider in ("reference", "torch"):
            case = Case(loss, provider, 64, 32, "fp32", "forward+backward", str(device))
            make_step(case, make_inputs(case))()
    gc.collect()


# -------------------------------------------------------------------------------------------- worker


def _worker_main(device_arg: str, role: str) -> None:
    """``python -m fastcontrast._bench --worker DEVICE ROLE``: JSON requests on stdin, JSON events on stdout.

    ROLE ``memory`` measures peak memory on each case's first call; ``timing`` only times.
    """
    # C-level prints (warnings from libraries) must not corrupt the protocol: fd 1 goes to stderr.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def send(message: dict) -> None:
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg)
    if device.type == "cuda":
        torch.cuda.init()
    meter = MemoryMeter(device) if role == "memory" else None
    warm_up_process(device)
    free, total = free_memory(device)
    providers = {p: provider_unavailable(p, device) for p in PROVIDERS}
    hard = _Budget(device, GIB)
    with hard:
        pass
    send({"event": "hello", "device": str(device), "role": role, "environment": environment(device),
          "memory_measure": meter.name if meter else None,
          "memory_measure_description": meter.description if meter else None,
          "free_bytes": free, "total_bytes": total, "providers": providers, "hard_budget": hard.hard})
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        case = Case(**request["case"])
        result = run_case(case, meter, warmup=request["warmup"], repeats=request["repeats"],
                          time_limit=request.get("time_limit"), budget=request.get("budget"), on_event=send)
        send({"event": "result", "result": result})


class Worker:
    """A benchmark subprocess on one device, restarted when a case kills it or runs past the time limit."""

    def __init__(self, device: str = "auto", role: str = "memory", startup_timeout: float = 600.0):
        self.device_arg = device
        self.role = role
        self.startup_timeout = startup_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.hello: Optional[dict] = None
        self._lines: queue.Queue = queue.Queue()
        self._stderr = None

    def start(self) -> dict:
        if self.proc is not None and self.proc.poll() is None:
            return self.hello
        env = dict(os.environ)
        if self.role == "memory":
            # From the first allocation on (see the module docstring); the timing worker keeps the defaults.
            env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 2**10)
            env["MALLOC_TRIM_THRESHOLD_"] = str(128 * 2**10)
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._lines = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastcontrast._bench", "--worker", self.device_arg, self.role],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1, env=env,
        )
        lines = self._lines

        def pump(stream):
            for text in stream:
                lines.put(text)
            lines.put(None)

        threading.Thread(target=pump, args=(self.proc.stdout,), daemon=True).start()
        message = self._next(self.startup_timeout)
        if message is None or message.get("event") != "hello":
            reason = self._death_reason()
            self.stop()
            raise RuntimeError(f"the benchmark worker did not start: {reason}")
        self.hello = message
        return message

    def _next(self, timeout: float) -> Optional[dict]:
        """Next message, None at EOF; raises queue.Empty after ``timeout`` seconds of silence."""
        line = self._lines.get(timeout=timeout)
        return None if line is None else json.loads(line)

    def _death_reason(self) -> str:
        code = self.proc.wait(timeout=30) if self.proc is not None else None
        tail = ""
        if self._stderr is not None:
            self._stderr.seek(0)
            tail = self._stderr.read()[-1500:].strip()
        if code is not None and code < 0:
            return f"killed by signal {-code}" + (f"; stderr: {tail}" if tail else "")
        return f"exit code {code}" + (f"; stderr: {tail}" if tail else "")

    def run(
        self,
        case: Case,
        *,
        warmup: int,
        repeats: int,
        time_limit: Optional[float],
        budget: Optional[int],
        on_event: Optional[Callable[[dict], None]] = None,
        setup_timeout: float = 600.0,
    ) -> dict:
        """Run ``case`` in the worker; a call silent past ``time_limit`` (+10 %, +5 s) is killed."""
        self.start()
        request = {"case": asdict(case), "warmup": warmup, "repeats": repeats, "time_limit": time_limit,
                   "budget": budget}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        phase, timeout = "setup", setup_timeout
        while True:
            try:
                message = self._next(timeout)
            except queue.Empty:
                self.stop()
                if phase == "call":
                    reason = f"a call ran past the time limit of {time_limit:g} s and was stopped"
                else:
                    reason = f"building the inputs took more than {setup_timeout:g} s"
                return empty_row(case, "time-limited", reason)
            if message is None:
                reason = self._death_reason()
                self.proc = None
                # SIGKILL with no traceback is the kernel's OOM killer in practice.
                status = "oom" if "signal 9" in reason else "error"
                return empty_row(case, status, f"worker died: {reason}")
            if message["event"] == "result":
                return message["result"]
            if on_event is not None:
                on_event(message)
            if message["event"] in ("ready", "call") and time_limit is not None:
                phase, timeout = "call", time_limit * 1.1 + 5

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False


class Runner:
    """Runs cases on one device in worker subprocesses: peak memory and times.

    On CPU with the VmHWM measure, the memory worker (glibc mmap threshold fixed) measures and a timing
    worker (glibc defaults) times, see the module docstring; the timing worker goes first so that a case
    past the time limit is stopped before its memory is measured. Elsewhere (CUDA, or the tensor_bytes
    fallback) one worker does both: the first call is measured, later ones timed.
    """

    def __init__(self, device: str = "auto"):
        self.memory = Worker(device, "memory")
        self.timing: Optional[Worker] = None
        self.hello: Optional[dict] = None

    def start(self) -> dict:
        self.hello = self.memory.start()
        if self.hello["memory_measure"] == "cpu_vmhwm" and self.timing is None:
            self.timing = Worker(self.hello["device"], "timing")
            self.timing.start()
        return self.hello

    def run(self, case: Case, *, warmup: int, repeats: int, time_limit: Optional[float], budget: Optional[int],
            on_event: Optional[Callable[[dict], None]] = None) -> dict:
        """One case: see :func:`run_case` for the row. ``repeats=0`` times the single warm-up call."""
        if self.hello is None:
            self.start()
        if self.timing is None:
            return self.memory.run(case, warmup=warmup, repeats=repeats, time_limit=time_limit, budget=budget,
                                   on_event=on_event)
        timed = self.timing.run(case, warmup=warmup, repeats=repeats, time_limit=time_limit, budget=budget,
                                on_event=on_event)
        if timed["status"] != "ok":
            return timed
        # One call, no timing wanted: allow it the (page-fault-heavier) time the measure costs.
        limit = None if time_limit is None else 3 * time_limit
        measured = self.memory.run(case, warmup=1, repeats=0, time_limit=limit, budget=budget)
        if measured["status"] != "ok":
            return {**measured, "time_s": timed["time_s"], "times_s": timed["times_s"]}
        merged = {**timed}
        for key in ("peak_bytes", "input_bytes", "total_bytes", "memory_measure"):
            merged[key] = measured[key]
        return merged

    def stop(self) -> None:
        self.memory.stop()
        if self.timing is not None:
            self.timing.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False


# ------------------------------------------------------------------------------------ largest-N search


@dataclass
class SearchResult:
    """Largest N a provider fits in the memory budget, and why the doubling stopped."""

    loss: str
    provider: str
    d: int
    dtype: str
    mode: str
    budget_bytes: int
    largest_n: Optional[int] = None
    total_bytes_at_largest: Optional[int] = None
    time_s_at_largest: Optional[float] = None
    stopped_at_n: Optional[int] = None
    stop: str = ""  # memory | time | max-n | error | skipped
    stop_reason: str = ""
    projected_memory_limit_n: Optional[int] = None
    steps: list = field(default_factory=list)


def _project_memory_limit(steps: list, budget: int) -> Optional[int]:
    """N at which inputs + peak would reach the budget, extrapolated from the last two good steps: linear
    in N when memory grew less than 3× per doubling, quadratic otherwise. A projection, not a measurement."""
    good = [s for s in steps if s["status"] == "ok" and s.get("total_bytes")]
    if len(good) < 2:
        return None
    (n1, m1), (n2, m2) = [(s["n"], s["total_bytes"]) for s in good[-2:]]
    if m2 <= m1 or n2 <= n1:
        return None
    power = 2 if m2 / m1 > 3 else 1
    slope = (m2 - m1) / (n2**power - n1**power)
    intercept = m2 - slope * n2**power
    if budget <= intercept:
        return None
    return int(((budget - intercept) / slope) ** (1 / power))


def largest_n(
    run: Callable[[Case], dict],
    template: Case,
    *,
    budget: int,
    start: int,
    max_n: int,
    hard_budget: bool,
    known: Optional[dict] = None,
    time_limit: Optional[float] = None,
) -> SearchResult:
    """Double N from ``start`` until a step runs out of memory, passes the time limit, or N passes ``max_n``.

    ``run(case)`` measures one step (the caller applies the budget and the time limit). ``known`` maps N to
    results already measured (e.g. in the table) under the same budget, reused instead of re-run. Without a
    ``hard_budget`` (no RLIMIT_AS / CUDA fraction), a step whose memory, extrapolated from the previous two,
    would exceed the budget is not run. With ``time_limit``, a step whose time, extrapolated as 4× the last
    one's (every provider does O(N²·d) work), would pass the limit is not run either: it is reported as
    time-limited (projected) instead of spending the whole limit to find out.
    """
    search = SearchResult(template.loss, template.provider, template.d, template.dtype, template.mode, budget)
    n = start
    while True:
        if n > max_n:
            search.stop, search.stop_reason = "max-n", f"reached --search-max {max_n}"
            break
        if not hard_budget:
            projected = _project_memory_limit(search.steps, budget)
            if projected is not None and projected < n:
                search.stopped_at_n, search.stop = n, "memory"
                search.stop_reason = f"projected to exceed the budget above N≈{projected} (not run)"
                break
        last_time = search.time_s_at_largest
        if time_limit is not None and last_time is not None and search.largest_n and n > search.largest_n:
            projected_time = last_time * (n / search.largest_n) ** 2
            if projected_time > time_limit and n not in (known or {}):
                search.stopped_at_n, search.stop = n, "time"
                search.stop_reason = (f"projected {projected_time:.0f} s per step (N² × the last), past the "
                                      f"{time_limit:g} s limit; not run")
                break
        result = (known or {}).get(n) or run(Case(**{**asdict(template), "n": n}))
        search.steps.append(result)
        if result["status"] != "ok":
            search.stopped_at_n = n
            search.stop = {"oom": "memory", "time-limited": "time"}.get(result["status"], result["status"])
            search.stop_reason = result.get("reason") or result["status"]
            break
        search.largest_n = n
        search.total_bytes_at_largest = result["total_bytes"]
        search.time_s_at_largest = result["time_s"]
        n *= 2
    if search.stop == "time":
        search.projected_memory_limit_n = _project_memory_limit(search.steps, budget)
    return search


# ---------------------------------------------------------------------------------------- reporting


def _ratio(value: Optional[float], base: Optional[float]) -> str:
    if value is None or not base:
        return "—"
    return f"{value / base:.2f}×"


def _status_cell(result: dict) -> str:
    return {"oom": "OOM", "time-limited": "time limit", "skipped": "skipped", "error": "error"}.get(
        result["status"], result["status"])


def format_results_table(results: list) -> str:
    """Markdown tables, one per (loss, mode, dtype, d): time, peak memory and both ratios against naive."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r["loss"], r["mode"], r["dtype"], r["d"]), []).append(r)
    out = []
    for (loss, mode, dtype, d), rows in groups.items():
        naive = {r["n"]: r for r in rows if r["provider"] == "reference" and r["status"] == "ok"}
        out.append(f"{loss}, {mode}, {dtype}, d={d}")
        out.append("")
        out.append("| N | provider | time | peak memory | time vs naive | memory vs naive | model FLOP/s |")
        out.append("|---:|---|---:|---:|---:|---:|---:|")
        for r in sorted(rows, key=lambda r: (r["n"], PROVIDERS.index(r["provider"]))):
            label = PROVIDER_LABELS[r["provider"]]
            if r["status"] == "skipped":
                continue  # said once below
            if r["status"] != "ok":
                out.append(f"| {r['n']} | {label} | {_status_cell(r)} | | | | |")
                continue
            base = naive.get(r["n"])
            rate = format_flops(r.get("flops_per_s"))
            out.append(
                f"| {r['n']} | {label} | {format_seconds(r['time_s'])} | {format_bytes(r['peak_bytes'])} | "
                f"{_ratio(r['time_s'], base and base['time_s'])} | "
                f"{_ratio(r['peak_bytes'], base and base['peak_bytes'])} | {rate} |"
            )
        notes = sorted({f"{PROVIDER_LABELS[r['provider']]}: skipped, {r['reason']}" for r in rows
                        if r["status"] == "skipped"})
        notes += [f"{PROVIDER_LABELS[r['provider']]} N={r['n']}: {r['reason']}" for r in rows
                  if r["status"] not in ("ok", "skipped") and r.get("reason")]
        out.extend(["", *[f"- {note}" for note in notes]] if notes else [])
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def format_search_table(searches: list) -> str:
    if not searches:
        return ""
    out = []
    groups: dict = {}
    for s in searches:
        groups.setdefault((s.loss, s.mode, s.dtype, s.d, s.budget_bytes), []).append(s)
    for (loss, mode, dtype, d, budget), rows in groups.items():
        out.append(f"Largest N within a {format_bytes(budget)} budget ({loss}, {mode}, {dtype}, d={d}; "
                   "the budget covers inputs, gradients and everything the step allocates)")
        out.append("")
        out.append("| provider | largest N | memory at that N | step time | stopped at N | why |")
        out.append("|---|---:|---:|---:|---:|---|")
        for s in rows:
            why = {"time": "time limit (not memory)", "max-n": "search cap"}.get(s.stop, s.stop)
            detail = f"{why}: {s.stop_reason}" if s.stop_reason else why
            if s.projected_memory_limit_n:
                detail += f"; memory alone would allow N≈{s.projected_memory_limit_n} (projected)"
            out.append(f"| {PROVIDER_LABELS[s.provider]} | {s.largest_n or '—'} | "
                       f"{format_bytes(s.total_bytes_at_largest)} | {format_seconds(s.time_s_at_largest)} | "
                       f"{s.stopped_at_n or '—'} | {detail} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def plot_results(results: list, path: str, title: str = "") -> None:
    """PNG of time and peak memory against N (log axes), one line per provider, one row per configuration."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            "--plot needs matplotlib, an optional dependency: pip install matplotlib "
            "(or pip install 'fastcontrast[bench]')."
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    groups: dict = {}
    for r in results:
        if r["status"] == "ok":
            groups.setdefault((r["loss"], r["mode"], r["dtype"], r["d"]), []).append(r)
    if not groups:
        raise ValueError("no successful measurement to plot")
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 4.2 * len(groups)), squeeze=False)
    for row, ((loss, mode, dtype, d), rows) in enumerate(groups.items()):
        ax_time, ax_mem = axes[row]
        all_n = sorted({r["n"] for r in rows})
        for provider in PROVIDERS:
            points = sorted((r["n"], r["time_s"], r["peak_bytes"]) for r in rows if r["provider"] == provider)
            if not points:
                continue
            label = PROVIDER_LABELS[provider]
            ax_time.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            # A peak of 0 (the call fit in memory already resident) has no place on a log axis.
            mem = [(p[0], p[2]) for p in points if p[2]]
            ax_mem.plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=label)
        for ax, ylabel, fmt in ((ax_time, "time per call", format_seconds),
                                (ax_mem, "peak extra memory", format_bytes)):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(FixedLocator(all_n))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{int(x)}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _, fmt=fmt: fmt(y)))
            low, high = ax.get_ylim()
            # Within one decade there is no major tick to label: label the minor ones instead.
            minor = FuncFormatter(lambda y, _, fmt=fmt: fmt(y)) if high < 10 * low else NullFormatter()
            ax.yaxis.set_minor_formatter(minor)
            ax.set_xlabel("N (batch size)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="major", alpha=0.3)
            ax.legend()
            ax.set_title(f"{loss}, {mode}, {dtype}, d={d}")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def load_average() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


# --------------------------------------------------------------------------------------------- the CLI

DEFAULT_N = {"cpu": [1024, 2048, 4096, 8192], "cuda": [4096, 16384, 65536, 262144]}
DEFAULT_D = {"cpu": 256, "cuda": 512}
DEFAULT_DTYPE = {"cpu": "fp32", "cuda": "bf16"}
# On CPU the default budget leaves a tenth of the available RAM to the rest of the machine.
CPU_BUDGET_FRACTION = 0.9


class _Progress:
    """tqdm over the cases when tqdm is installed (and wanted), else silent."""

    def __init__(self, enabled: bool, total: Optional[int], desc: str):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                print("(install tqdm for a progress bar: pip install tqdm)", file=sys.stderr)
            else:
                # disable=None: no bar when stderr is not a terminal (CI logs, pipes).
                self.bar = tqdm(total=total, desc=desc, unit="case", file=sys.stderr, dynamic_ncols=True,
                                disable=None)

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def bench_cli(args) -> int:
    """``python -m fastcontrast bench``: see ``python -m fastcontrast bench --help``."""
    started = time.time()
    load_start = load_average()
    modes = [parse_mode(m) for m in args.mode]
    for loss in args.loss:
        if loss not in LOSSES:
            raise SystemExit(f"--loss must be among {', '.join(LOSSES)}, got {loss!r}")
    for dtype in args.dtype or []:
        if dtype not in DTYPES:
            raise SystemExit(f"--dtype must be among {', '.join(DTYPES)}, got {dtype!r}")
    if args.plot and not args.plot.lower().endswith(".png"):
        raise SystemExit(f"--plot writes a PNG: give a path ending in .png, got {args.plot!r}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("--plot needs matplotlib, an optional dependency: pip install matplotlib "
                             "(or pip install 'fastcontrast[bench]').") from None

    print("starting the benchmark worker…", file=sys.stderr)
    with Runner(args.device) as worker:
        hello = worker.start()
        device = hello["device"]
        kind = torch.device(device).type
        env = hello["environment"]
        ns = args.n or DEFAULT_N.get(kind, DEFAULT_N["cpu"])
        d_list = args.d or [DEFAULT_D.get(kind, 256)]
        dtypes = args.dtype or [DEFAULT_DTYPE.get(kind, "fp32")]
        providers = args.providers or list(PROVIDERS)
        if args.memory_budget is not None:
            budget = parse_bytes(args.memory_budget)
            budget_source = "--memory-budget"
        elif kind == "cuda":
            budget, budget_source = hello["free_bytes"], "free device memory"
        else:
            budget = int(hello["free_bytes"] * CPU_BUDGET_FRACTION)
            budget_source = f"{CPU_BUDGET_FRACTION:.0%} of available RAM"
        header = [
            f"command: python -m fastcontrast bench {' '.join(args.argv)}".rstrip(),
            f"device: {env['device_name']}",
            f"date: {now_utc()}",
            f"versions: fastcontrast {env['fastcontrast']}, torch {env['torch']}, triton {env['triton']}, "
            f"python {env['python']}",
            f"peak memory: {hello['memory_measure_description']}",
            f"memory budget: {format_bytes(budget)} ({budget_source}; "
            + ("enforced: allocations past it fail" if hello["hard_budget"] else "checked on measured peaks")
            + f"); time limit per call: {args.time_limit:g} s",
            f"model FLOPs: {FLOPS_FORMULA}",
        ]
        if kind == "cpu":
            header.insert(1, "CPU figures (no GPU used).")
        print("\n".join(header), file=sys.stderr if args.quiet else sys.stdout, flush=True)

        cases = [Case(loss, provider, n, d, dtype, mode, device, args.chunk_bytes)
                 for loss in args.loss for mode in modes for dtype in dtypes for d in d_list for n in ns
                 for provider in providers]
        results = []
        progress = _Progress(not args.no_progress, len(cases), "bench")
        for case in cases:
            progress.describe(f"{case.loss} {PROVIDER_LABELS[case.provider]} N={case.n}")
            reason = hello["providers"].get(case.provider, "unknown provider")
            if reason is not None:
                result = empty_row(case, "skipped", reason)
            else:
                def on_event(event, case=case):
                    if event.get("event") == "call":
                        progress.describe(f"{case.loss} {PROVIDER_LABELS[case.provider]} N={case.n} "
                                          f"call {event['index'] + 1}/{event['calls']}")
                result = worker.run(case, warmup=args.warmup, repeats=args.repeats,
                                    time_limit=args.time_limit, budget=budget, on_event=on_event)
            results.append(result)
            progress.advance()
        progress.close()

        searches = []
        if not args.no_search:
            search_mode = "forward+backward" if "forward+backward" in modes else modes[0]
            progress = _Progress(not args.no_progress, None, "largest N")

            def run_step(case):
                progress.describe(f"{case.loss} {PROVIDER_LABELS[case.provider]} N={case.n}")
                step = worker.run(case, warmup=1, repeats=0, time_limit=args.time_limit, budget=budget)
                progress.advance()
                return step

            for loss, dtype, d, provider in itertools.product(args.loss, dtypes, d_list, providers):
                if hello["providers"].get(provider, "unknown") is not None:
                    continue
                template = Case(loss, provider, 0, d, dtype, search_mode, device, args.chunk_bytes)
                known = {r["n"]: r for r in results
                         if {**r, "n": 0}.items() >= asdict(template).items()}
                searches.append(largest_n(
                    run_step, template, budget=budget, start=args.search_start or min(ns),
                    max_n=args.search_max, hard_budget=hello["hard_budget"], known=known,
                    time_limit=args.time_limit))
            progress.close()

    print()
    print(format_results_table(results))
    if searches:
        print(format_search_table(searches))
    load_end = load_average()
    if load_start is not None:
        print(f"load average (1, 5, 15 min) at start {load_start}, at end {load_end}; "
              f"{os.cpu_count()} logical cores; wall time {time.time() - started:.0f} s")
    meta = {"command": "python -m fastcontrast bench " + " ".join(args.argv), "date": now_utc(),
            "environment": env, "memory_measure": hello["memory_measure"],
            "memory_measure_description": hello["memory_measure_description"],
            "memory_budget_bytes": budget, "memory_budget_source": budget_source,
            "budget_enforced": hello["hard_budget"], "time_limit_s": args.time_limit,
            "flops_formula": FLOPS_FORMULA, "load_average_start": load_start, "load_average_end": load_end,
            "wall_time_s": time.time() - started}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results, "largest_n": [asdict(s) for s in searches]}, f,
                      indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot_results(results, args.plot, title=f"{env['device_name']} — {now_utc()}")
        print(f"wrote {args.plot}")
    return 1 if any(r["status"] == "error" for r in results) else 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker" and sys.argv[3] in ("memory", "timing"):
        _worker_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m fastcontrast._bench --worker DEVICE memory|timing (internal: see "
                 "`python -m fastcontrast bench`)")
