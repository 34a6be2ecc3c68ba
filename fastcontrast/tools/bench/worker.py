"""Running benchmark cases: one case in this process (:func:`run_case`), or in worker subprocesses that keep
the parent's memory clean, enforce the memory budget and let a call past the time limit be killed
(:class:`Worker`, :class:`Runner`). A worker is ``python -m fastcontrast.tools.bench.worker DEVICE ROLE``.
"""

from __future__ import annotations

import gc
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from typing import Callable, Optional

import torch

from fastcontrast.tools.bench.cases import (
    GIB,
    LOSSES,
    PROVIDERS,
    Case,
    environment,
    format_bytes,
    free_memory,
    input_bytes,
    make_inputs,
    make_step,
    model_flops,
    provider_unavailable,
)
from fastcontrast.tools.bench.meters import MemoryMeter, _Budget, is_out_of_memory


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

def _worker_main(device_arg: str, role: str) -> None:
    """``python -m fastcontrast.tools.bench.worker DEVICE ROLE``: JSON requests on stdin, JSON events on stdout.

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
            [sys.executable, "-m", "fastcontrast.tools.bench.worker", self.device_arg, self.role],
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


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[2] in ("memory", "timing"):
        _worker_main(sys.argv[1], sys.argv[2])
    else:
        sys.exit("usage: python -m fastcontrast.tools.bench.worker DEVICE memory|timing (internal: see "
                 "`python -m fastcontrast bench`)")
