"""Benchmark cases: what one measurement is (loss, provider, N, d, dtype, mode, device), its inputs, the step it
times, model FLOPs, and the formatting of sizes, rates and times. Shared by ``python -m fastcontrast bench`` and
the pytest-benchmark suite (docs/benchmarks.md).

Providers are the naive reference (``backend="reference"``: open_clip's / lightly's / sentence-transformers'
math with the full logits),
the blockwise torch engine (``backend="torch"``) and the Triton engine (``backend="triton"``, CUDA only). Modes
are ``forward`` (the loss with inputs that require grad, as in training, output dropped) and
``forward+backward`` (the loss and ``torch.autograd.grad`` of it with respect to every input).

FLOPs are *model* FLOPs: the GEMM work of the naive loss, the same number for every provider, so that
achieved FLOP/s compare providers on equal terms (a provider that does less or more work shows it as a
higher or lower rate). See :func:`model_flops`.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

LOSSES = ("clip", "siglip", "nt_xent", "mnrl")
PROVIDERS = ("reference", "torch", "triton")
PROVIDER_LABELS = {"reference": "naive", "torch": "blockwise torch", "triton": "triton"}
MODES = ("forward", "forward+backward")
MODE_ALIASES = {"fwd": "forward", "forward": "forward", "fwd+bwd": "forward+backward",
                "forward+backward": "forward+backward", "train": "forward+backward"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}

# Logits matrices of n×m the naive loss computes: open_clip's ClipLoss builds logits_per_image and
# logits_per_text (2 matrices); SigLipLoss one; lightly's NTXentLoss the four n×n blocks 00, 01, 10, 11
# (one (2n)×(2n) matrix); sentence-transformers' MultipleNegativesRankingLoss, benchmarked with one hard negative
# per query (N queries × 2N candidates), one n×2n matrix.
NAIVE_MATRICES = {"clip": 2, "siglip": 1, "nt_xent": 4, "mnrl": 2}
FLOPS_FORMULA = (
    "model FLOPs = passes × matrices × 2·N·N·d, the naive loss's GEMM work: passes = 1 (forward) or 3 "
    "(forward+backward: the logits GEMM and the two gradient GEMMs); matrices = 2 for CLIP (logits_per_image "
    "and logits_per_text), 1 for SigLIP, 4 for NT-Xent (lightly's four N×N blocks), 2 for MNRL (N queries × "
    "2N candidates: a positive and a hard negative per query); N = batch size. "
    "Elementwise work is not counted. The same count is used for every provider."
)

# Scales as at initialisation: open_clip's logit_scale = exp(log(1/0.07)), SigLIP's t' = log 10, b = −10,
# lightly's default temperature.
CLIP_SCALE = 1 / 0.07
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0
NT_XENT_TEMPERATURE = 0.5
MNRL_SCALE = 20.0  # sentence-transformers' default

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
    if error is not None:
        return f"triton does not import: {error}"
    from fastcontrast._targets import triton_support

    support = triton_support(torch.device(device))
    return None if support.checked else support.reason


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
    if case.loss == "mnrl":  # queries, positives, one hard negative each; cos_sim normalises them itself
        return {"a": features(False), "b": features(False), "c": features(False), "scale": None, "bias": None}
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
    elif case.loss == "mnrl":
        def loss_fn():
            return functional.multiple_negatives_ranking_loss([a, b, inputs["c"]], MNRL_SCALE, **kwargs)
    else:
        def loss_fn():
            return functional.nt_xent_loss(a, b, NT_XENT_TEMPERATURE, **kwargs)
    wrt = [t for t in (a, b, inputs.get("c"), scale, bias) if t is not None]
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
        from fastcontrast.engine import tf32_matmul_enabled

        env["cuda"] = torch.version.cuda
        env["tf32_matmul"] = tf32_matmul_enabled()
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
