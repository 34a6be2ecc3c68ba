"""Backend choice: ``"auto" | "triton" | "torch" | "reference"``.

``"auto"`` picks the Triton engine for CUDA tensors when triton imports, else the blockwise torch engine.
The environment variable ``FASTCONTRAST_BACKEND`` overrides ``"auto"`` (never an explicit choice).
Nothing here touches CUDA or imports triton at import time.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

from fastcontrast._ops import HAS_CUSTOM_OP, OpEngine
from fastcontrast.blockwise import TorchEngine

BACKENDS = ("auto", "triton", "torch", "reference")
ENV_BACKEND = "FASTCONTRAST_BACKEND"

_warned_triton_missing = False


def check_backend(backend: object) -> str:
    """Validate a backend name (also used at module construction, so typos fail early)."""
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {', '.join(repr(b) for b in BACKENDS)}, got {backend!r}.")
    return backend  # type: ignore[return-value]


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_import_error() -> Optional[str]:
    """None if the Triton engine imports, else the reason it does not."""
    try:
        import fastcontrast.kernels.engine  # noqa: F401
    except Exception as exc:  # ImportError, or a broken triton install raising anything else
        return f"{type(exc).__name__}: {exc}"
    return None


def auto_backend(device: torch.device) -> tuple[str, str]:
    """The backend ``"auto"`` picks for tensors on ``device``, and why."""
    override = os.environ.get(ENV_BACKEND)
    if override:
        if override not in BACKENDS or override == "auto":
            raise ValueError(
                f"environment variable {ENV_BACKEND} must be one of 'triton', 'torch', 'reference', got {override!r}."
            )
        return override, f"{ENV_BACKEND}={override}"
    if device.type != "cuda":
        return "torch", f"tensors on {device.type}: the Triton kernels need CUDA"
    error = triton_import_error()
    if error is not None:
        return "torch", f"triton does not import ({error})"
    return "triton", "CUDA tensors and triton imports"


def resolve_engine(backend: str, device: torch.device, chunk_bytes: Optional[int] = None):
    """The engine object for ``backend`` on ``device``, or None for ``"reference"``.

    The engine is called through torch custom ops (:class:`fastcontrast._ops.OpEngine`) where torch has them
    (2.4+), so that torch.compile sees each engine call as one op.

    Raises:
        ValueError: unknown backend, or ``"triton"`` on CPU tensors without ``TRITON_INTERPRET=1``.
        ImportError: ``"triton"`` asked for explicitly and triton does not import.
    """
    global _warned_triton_missing
    check_backend(backend)
    if backend == "auto":
        backend, reason = auto_backend(device)
        if backend == "torch" and device.type == "cuda" and not _warned_triton_missing:
            _warned_triton_missing = True
            warnings.warn(
                f"fastcontrast: using the blockwise torch engine on CUDA because {reason}. "
                "Install triton>=3.2 for the fused kernels.",
                RuntimeWarning,
                stacklevel=3,
            )
    if backend == "reference":
        return None
    if backend == "torch":
        engine = TorchEngine(chunk_bytes)  # validates chunk_bytes
        return OpEngine("torch", engine.chunk_bytes) if HAS_CUSTOM_OP else engine
    if device.type != "cuda" and not triton_interpreter_enabled():
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got tensors on {device}. Use backend='torch' (or 'auto') on "
            "this device, or set TRITON_INTERPRET=1 before importing triton to run the kernels in its interpreter."
        )
    error = triton_import_error()
    if error is not None:
        raise ImportError(f"backend='triton' needs triton>=3.2: {error}")
    from fastcontrast.kernels.engine import TritonEngine

    return OpEngine("triton", 0) if HAS_CUSTOM_OP else TritonEngine()
