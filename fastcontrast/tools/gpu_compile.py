"""gpu-check's first section: every kernel variant the run will launch, compiled in parallel before any timing.

Which variants? Those the engine's own host code launches for the shapes each section uses (gpu-check's
``workloads``): each workload runs forward and backward inside
:func:`fastcontrast.kernels.launches.recorded_launches`, which records every launch instead of running it, and
each record is specialised exactly as triton's launcher specialises it (:func:`fastcontrast.kernels.aot.
_specialise`, the compile table's own rule). On a GPU the workloads run on the GPU's tensors (their glue ops
take milliseconds there, and pointers and strides are the real ones); elsewhere on CPU tensors under
:func:`fastcontrast.kernels.configs.assume_target`, what ``--plan`` does.

Compiling: one ``triton.compile`` per variant for the device's target, in a ``ProcessPoolExecutor`` (spawn
context: a forked CUDA process is unsafe) over the host's cores. ``triton.compile`` writes triton's on-disk
cache under the same key a launch computes, so the sections after this one load binaries instead of
compiling them; each section logs any compile it still does (:func:`log_cache_misses`).

Runs without ``TRITON_INTERPRET`` (``triton.compile`` cannot take the interpreter's functions): gpu-check starts
this section in a subprocess without it, on ``--dry`` too, where the plan is recorded for sm_90 and nothing
is compiled.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import multiprocessing
import os
import time
from typing import Callable, Iterable, Iterator, Optional

import torch

# A workload: (section, label, run(device, backend)); run builds its inputs and does one forward + backward.
Workload = tuple[str, str, Callable[[torch.device, str], object]]


def arch_name(target) -> str:
    """``("cuda", 90)`` → ``"sm_90"``; ``("hip", "gfx942")`` → ``"gfx942"``."""
    return f"sm_{target[1]}" if target[0] == "cuda" else str(target[1])


def parse_arch(arch: str) -> tuple:
    """``"sm_90"`` → ``("cuda", 90)``; ``"gfx942"`` → ``("hip", "gfx942")``."""
    return ("cuda", int(arch[3:])) if arch.startswith("sm_") else ("hip", arch)


@contextlib.contextmanager
def _recording(target, device: torch.device) -> Iterator[dict]:
    """Within the block, every launch is specialised for ``target`` and kept in the yielded {key: Variant};
    nothing runs. On CPU tensors the dispatcher is told the interpreter is on (it refuses ``backend="triton"``
    on CPU otherwise), while the launchers keep the real answer, so their flags are a GPU's."""
    from triton.compiler import make_backend

    import fastcontrast.kernels.engine  # noqa: F401 - binds the launchers' own interpreter check first
    from fastcontrast import _dispatch
    from fastcontrast.kernels import aot
    from fastcontrast.kernels.configs import assume_target, gpu_target
    from fastcontrast.kernels.launches import recorded_launches

    backend = make_backend(gpu_target(target))
    arch = arch_name(target)
    found: dict = {}

    def keep(launch):
        variant = aot._specialise(launch, arch, backend)
        found.setdefault(variant.key(), variant)
        return None  # nothing of the launch is kept: at N = 65,536 its tensors are GBs

    saved_check = _dispatch.triton_interpreter_enabled
    saved_backend = os.environ.get(_dispatch.ENV_BACKEND)
    os.environ[_dispatch.ENV_BACKEND] = "triton"  # steps that say backend="auto" (the host-sync section's)
    if device.type != "cuda":
        _dispatch.triton_interpreter_enabled = lambda: True
    try:
        with assume_target(target), recorded_launches(keep):
            yield found
    finally:
        _dispatch.triton_interpreter_enabled = saved_check
        if saved_backend is None:
            os.environ.pop(_dispatch.ENV_BACKEND, None)
        else:
            os.environ[_dispatch.ENV_BACKEND] = saved_backend


def record_variants(workloads: Iterable[Workload], target, device: torch.device) -> tuple[list, list[dict]]:
    """(every distinct Variant the workloads launch on ``target``, one dict per workload: section, label,
    the variants it added, seconds, the digests of all it launches, and the error if its recording failed: a
    plan never stops on one)."""
    import warnings

    variants: dict = {}
    per_workload = []
    for section, label, run in workloads:
        start = time.perf_counter()
        before = len(variants)
        entry = {"section": section, "workload": label}
        try:
            with warnings.catch_warnings(), _recording(target, device) as found:
                warnings.simplefilter("ignore")
                run(device, "triton")
        except Exception as exc:  # noqa: BLE001 - reported with the plan; the section itself will say more
            entry["error"] = f"{type(exc).__name__}: {exc}"
            found = {}
        for key, variant in found.items():
            variants.setdefault(key, variant)
        entry.update(new_variants=len(variants) - before, seconds=round(time.perf_counter() - start, 2),
                     digests=sorted(variant.digest() for variant in found.values()))
        per_workload.append(entry)
    return list(variants.values()), per_workload


def variant_spec(variant) -> dict:
    """What a spawned worker needs to compile ``variant`` (jit functions do not pickle: the kernel by module
    and name)."""
    fn = variant.kernel.fn
    return {"module": fn.__module__, "kernel": fn.__name__, "arch": variant.arch, "signature": variant.signature,
            "constexprs": variant.constexprs, "attrs": variant.attrs, "options": dict(variant.options.__dict__),
            "key": variant.digest(), "flags": variant.flags(), "block": variant.tile()}


def compile_spec(spec: dict) -> dict:
    """Compile one variant (a :func:`variant_spec`) into triton's cache; whether it was there already, and
    the seconds it took. Runs in a pool worker."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    from fastcontrast.kernels.aot import target_of

    kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    hits: list = []

    def listener(*, cache_hit, **_):
        hits.append(cache_hit)

    saved = knobs.compilation.listener
    knobs.compilation.listener = listener
    start = time.perf_counter()
    try:
        source = ASTSource(fn=kernel, signature=spec["signature"], constexprs=spec["constexprs"], attrs=spec["attrs"])
        triton.compile(source, target=target_of(spec["arch"]), options=spec["options"])
    finally:
        knobs.compilation.listener = saved
    return {"kernel": spec["kernel"], "key": spec["key"], "flags": spec["flags"], "block": spec["block"],
            "cache_hit": bool(hits and hits[-1]), "seconds": round(time.perf_counter() - start, 2)}


def compile_in_pool(specs: list[dict], workers: Optional[int] = None,
                    on_result: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Compile every spec with ``workers`` spawned processes (default: the host's cores); ``on_result`` is
    called with each result as it arrives (a failed compile is a result with ``error``)."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(specs)))
    results = []
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {pool.submit(compile_spec, spec): spec for spec in specs}
        for future in concurrent.futures.as_completed(futures):
            spec = futures[future]
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - one failed compile is reported; the others go on
                result = {"kernel": spec["kernel"], "key": spec["key"], "flags": spec["flags"], "block": spec["block"],
                          "error": f"{type(exc).__name__}: {exc}"}
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results


def log_cache_misses(add: Callable[[dict], None]) -> None:
    """From now on in this process, every kernel triton compiles (not found in its cache) is reported through
    ``add`` as an ``info`` record: after the compile section, each one is a variant the plan missed."""
    try:
        from triton import knobs
    except ImportError:  # pragma: no cover - no triton, nothing compiles
        return

    def listener(*, src, metadata, cache_hit, times=None, **_):
        if not cache_hit:
            add({"check": "cache miss", "status": "info", "kernel": getattr(src, "name", str(src)),
                 "compile_s": round(times.total / 1e6, 2) if hasattr(times, "total") else None})

    knobs.compilation.listener = listener


def not_in_table(variants: list, table_arch: str, rows: list[dict]) -> list[dict]:
    """The variants whose binary the compile table (``rows``) does not hold for ``table_arch``, keyed as the
    binaries check keys a launched binary (its Variant under the table's architecture): what that check would
    fail on, known before anything runs."""
    import dataclasses

    keys = {row["key"] for row in rows if row["arch"] == table_arch}
    return [{"kernel": v.name, "dtype": v.dtype, "precision": v.precision, "flags": v.flags(), "block": v.tile(),
             "digest": v.digest()} for v in variants if dataclasses.replace(v, arch=table_arch).digest() not in keys]
