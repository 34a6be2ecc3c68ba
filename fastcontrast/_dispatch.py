"""Backend choice: ``"auto" | "triton" | "torch" | "reference"`` → an engine object (or None for the reference).

``"auto"`` picks the Triton engine for CUDA tensors the kernels take (fp16, bf16, fp32) on a device the compile
table has checked binaries for (:mod:`fastcontrast._targets`) when triton imports, else the blockwise torch
engine. The environment variable ``FASTCONTRAST_BACKEND`` overrides ``"auto"``
(never an explicit choice). Nothing here touches CUDA or imports triton at import time.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Optional

import torch

from fastcontrast._targets import triton_support
from fastcontrast._validation import BACKENDS, check_chunk_bytes
from fastcontrast.engine import Engine

ENV_BACKEND = "FASTCONTRAST_BACKEND"
# What the Triton kernels take; LSEs and gradients come back in fp32 whatever the input.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_warned_triton_missing = False


def triton_interpreter_enabled() -> bool:
    """Whether triton's CPU interpreter is on (TRITON_INTERPRET=1, which must be set before triton's import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_import_error() -> Optional[str]:
    """None if the Triton engine imports, else the reason it does not (asked once per process)."""
    try:
        import fastcontrast.kernels.engine  # noqa: F401
    except Exception as exc:  # ImportError, or a broken triton install raising anything else
        return f"{type(exc).__name__}: {exc}"
    return None


def auto_backend(device: torch.device, dtype: Optional[torch.dtype] = None) -> tuple[str, str]:
    """The backend ``"auto"`` picks for tensors on ``device`` of ``dtype`` (None: any float dtype), and why."""
    override = os.environ.get(ENV_BACKEND)
    if override:
        if override not in BACKENDS or override == "auto":
            raise ValueError(
                f"environment variable {ENV_BACKEND} must be one of 'triton', 'torch', 'reference', got {override!r}."
            )
        return override, f"{ENV_BACKEND}={override}"
    if device.type != "cuda":
        return "torch", f"tensors on {device.type}: the Triton kernels need CUDA"
    if dtype is not None and dtype not in TRITON_DTYPES:
        return "torch", f"{dtype} features: the Triton kernels take float16, bfloat16 and float32"
    support = triton_support(device)
    if not support.checked:
        return "torch", support.reason
    error = triton_import_error()
    if error is not None:
        return "torch", f"triton does not import ({error})"
    reason = f"CUDA tensors and triton imports; {support.reason}"
    if torch.version.hip is not None:
        reason += " (ROCm: compiled and checked, not yet run on AMD hardware)"
    return "triton", reason + ("" if dtype is not None else "; float64 features go to the torch engine")


def resolve_engine(backend: str, device: torch.device, dtype: torch.dtype = torch.float32,
                   chunk_bytes: Optional[int] = None) -> Optional[Engine]:
    """The engine for ``backend`` and features of ``dtype`` on ``device``, or None for ``"reference"``.

    ``backend`` must already be valid (:func:`fastcontrast._validation.check_backend`).

    Raises:
        ValueError: ``"triton"`` on CPU tensors without ``TRITON_INTERPRET=1``, or on a GPU the compile table
            has no checked binaries for (below sm_80, sm_12x, ROCm archs other than gfx90a / gfx942);
            bad ``chunk_bytes``.
        TypeError: ``"triton"`` with float64 features.
        ImportError: ``"triton"`` asked for explicitly and triton does not import.
    """
    global _warned_triton_missing
    asked = "backend='triton'"
    if backend == "auto":
        backend, reason = auto_backend(device, dtype)
        if backend == "triton" and reason.startswith(ENV_BACKEND):
            asked = f"{ENV_BACKEND}=triton"
        if backend == "torch" and device.type == "cuda" and dtype in TRITON_DTYPES and not _warned_triton_missing:
            _warned_triton_missing = True
            advice = " Install triton>=3.2 for the fused kernels." if reason.startswith("triton does not") else ""
            warnings.warn(
                f"fastcontrast: using the blockwise torch engine on CUDA because {reason}.{advice}",
                RuntimeWarning,
                stacklevel=3,
            )
    if backend == "reference":
        return None
    if backend == "torch":
        from fastcontrast.blockwise import TorchEngine

        return TorchEngine(check_chunk_bytes(chunk_bytes))
    if device.type != "cuda" and not triton_interpreter_enabled():
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got tensors on {device}. Use backend='torch' (or 'auto') on "
            "this device, or set TRITON_INTERPRET=1 before importing triton to run the kernels in its interpreter."
        )
    if device.type == "cuda":
        support = triton_support(device)
        if not support.checked:
            # A binary nobody compiled and checked for this part may exceed its shared memory or registers and
            # fail at launch: refuse before launching anything.
            raise ValueError(f"{asked}: {support.reason}. Use backend='torch' (or 'auto', which picks it on "
                             "this device).")
    if dtype not in TRITON_DTYPES:
        raise TypeError(
            f"backend='triton' supports float16, bfloat16 and float32 features, got {dtype}; "
            "use backend='torch' (or 'auto') for float64."
        )
    error = triton_import_error()
    if error is not None:
        raise ImportError(f"backend='triton' needs triton>=3.2: {error}")
    from fastcontrast.kernels.engine import TritonEngine

    return TritonEngine()
