"""Tile sizes, warps and pipeline depth of every kernel, by target and feature-dim bucket (DESIGN §4, "Configs").

There is no autotuning: the interpreter cannot autotune, and a fixed table keeps results bit-reproducible
across runs. Every entry is compiled for sm_80, sm_90, sm_100, gfx90a and gfx942 by the compile checks
(:mod:`fastcontrast.kernels.aot`), which assert zero spills and the shared-memory limit, and read off the
sm_90 binaries' wgmma shapes and ``cp.async`` use.

Why the tiles are what they are:

- Hopper (sm_90, and sm_100, which runs the same tiles): 16-bit ``tl.dot`` lowers to wgmma, whose N is the
  tile's N divided by the warpgroups along N. Row tiles of 128 with 8 warps put the two warpgroups along M,
  so every instruction spans the whole column tile: m64n128 in the forward and panel kernels, m64n64 /
  m64n128 / m64n256 in the fused gradient. ``num_stages`` ≥ 2 everywhere (1 emits no ``cp.async``).
- Ampere (sm_80): mma.sync m16n8k16 has no such constraint; 128×64 tiles with 4 warps keep registers low.
- AMD (gfx90a, gfx942; 64-wide wavefronts): the Ampere tiles, compiled by triton's HIP backend.
- fp32 operands take twice the registers and shared memory of 16-bit ones: smaller tiles.

The gradient has two paths (DESIGN §4 "Backward"; the fast-by-design issue). For d ≤ ``FUSED_MAX_D`` the
fused kernel keeps the [BLOCK_M, d] fp32 accumulator and the row tile of X in registers across the column
loop, as FlashAttention does. Above that the accumulator cannot stay on chip, and read-modify-writing it per
column block made the kernel memory-bound (8·n·m·d/BLOCK_N bytes); the panel path instead writes dS for a
``PANEL_ROWS × PANEL_COLS`` panel once (input dtype) and multiplies it out with two GEMM kernels: 3 passes
over S instead of 4, every one compute-bound by counted bytes (about d FLOPs per byte).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch

# "interpreter", ("cuda", 80 | 86 | 89 | 90 | 100 | ...) or ("hip", "gfx90a" | "gfx942" | ...).
Target = Union[str, tuple]


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class PanelConfig:
    """Rows × columns of one dS panel of the panel gradient path (scratch: rows·cols in the input dtype)."""

    rows: int
    cols: int


# SMs (CUs on AMD) of the usual part of each target: A100, H100 / H200, B200, MI250X (per GCD), MI300X. Used
# only where the target is assumed rather than present (the compile checks and the work model).
TYPICAL_MULTIPROCESSORS = {("cuda", 80): 108, ("cuda", 90): 132, ("cuda", 100): 148, ("hip", "gfx90a"): 110,
                           ("hip", "gfx942"): 304}

_TARGET_OVERRIDE: contextvars.ContextVar[Optional[Target]] = contextvars.ContextVar("target", default=None)


@contextlib.contextmanager
def assume_target(target: Target) -> Iterator[None]:
    """Within the block, every config is the one ``target`` would get (the compile checks and the work
    model record what a GPU would launch, on this CPU machine)."""
    token = _TARGET_OVERRIDE.set(target)
    try:
        yield
    finally:
        _TARGET_OVERRIDE.reset(token)


@functools.cache
def _device_target(device: torch.device) -> Target:
    props = torch.cuda.get_device_properties(device)
    if torch.version.hip is not None:
        return ("hip", props.gcnArchName.split(":")[0])
    return ("cuda", 10 * props.major + props.minor)


def target_for(device: torch.device) -> Target:
    """The target whose configs launch for tensors on ``device``: the interpreter for CPU tensors."""
    override = _TARGET_OVERRIDE.get()
    if override is not None:
        return override
    return "interpreter" if device.type != "cuda" else _device_target(device)


def _family(target: Target) -> str:
    if target == "interpreter":
        return "interpreter"
    if target[0] == "hip":
        return "amd"
    return "blackwell" if target[1] >= 100 else "hopper" if target[1] >= 90 else "ampere"


def gpu_target(target: Target):
    """triton's ``GPUTarget`` for a (non-interpreter) target."""
    from triton.backends.compiler import GPUTarget

    return GPUTarget(target[0], target[1], 64 if target[0] == "hip" else 32)


@functools.cache
def has_tf32(target: Target) -> bool:
    """Whether triton's backend for ``target`` takes ``input_precision="tf32"``: every NVIDIA target; on AMD
    only where the backend enables it (gfx942's XF32, as of triton 3.9), never gfx90a."""
    if target == "interpreter":
        return False
    if target[0] == "cuda":
        return True
    from triton.compiler import make_backend

    try:
        options = make_backend(gpu_target(target)).parse_options({})
    except Exception:  # a backend this triton cannot build for: it cannot launch there either
        return False
    return "tf32" in getattr(options, "allowed_dot_input_precisions", ())


# Where a family has no entry of its own it takes the next one's: Blackwell runs Hopper's tiles.
_FALLBACK = {"blackwell": "hopper", "amd": "ampere"}


def _precision(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


# The interpreter runs tiles as numpy arrays on the CPU: small tiles keep tests fast and still exercise
# ragged edges (n, m, d not multiples of the block), the chunked-d forward (d > 64) and, through the small
# panels, a panel path with several ragged panels in both directions.
INTERPRETER_CONFIG = KernelConfig(block_m=32, block_n=32, block_d=64, num_warps=1, num_stages=1)
INTERPRETER_PANEL = PanelConfig(rows=64, cols=96)

_GPU_PANEL = {"half": PanelConfig(4096, 4096), "fp32": PanelConfig(2048, 4096)}

# The largest d the fused gradient keeps on chip, per precision (above: the panel path).
FUSED_MAX_D = {"half": 256, "fp32": 128}

_FORWARD = {  # lse_forward, siglip_forward: (family, precision) -> config
    ("hopper", "half"): KernelConfig(128, 64, 64, num_warps=8, num_stages=3),
    ("hopper", "fp32"): KernelConfig(32, 64, 32, num_warps=4, num_stages=3),
    ("ampere", "half"): KernelConfig(128, 64, 64, num_warps=8, num_stages=3),
    ("ampere", "fp32"): KernelConfig(32, 64, 32, num_warps=4, num_stages=2),
}
# SigLIP's softplus keeps more values live than the online max/sum: 8 warps on Ampere.
_SIGLIP_FORWARD = {
    ("hopper", "half"): KernelConfig(128, 64, 64, num_warps=8, num_stages=3),
    ("hopper", "fp32"): KernelConfig(32, 64, 32, num_warps=4, num_stages=3),
    ("ampere", "half"): KernelConfig(128, 64, 64, num_warps=8, num_stages=3),
    ("ampere", "fp32"): KernelConfig(64, 64, 32, num_warps=8, num_stages=2),
}
# The dS kernel of the panel path keeps no running reductions: the full 128×128 tile fits.
_DS_PANEL = {
    ("hopper", "half"): KernelConfig(128, 128, 64, num_warps=8, num_stages=3),
    ("hopper", "fp32"): KernelConfig(64, 64, 32, num_warps=4, num_stages=3),
    ("ampere", "half"): KernelConfig(128, 64, 64, num_warps=4, num_stages=3),
    ("ampere", "fp32"): KernelConfig(64, 64, 32, num_warps=4, num_stages=2),
}

# Fused gradient by d bucket (upper bounds), with BLOCK_D the accumulator's width (the whole padded d).
_GRADIENT = {
    ("hopper", "half"): (
        (64, KernelConfig(128, 64, 64, num_warps=8, num_stages=3)),
        (128, KernelConfig(128, 64, 128, num_warps=8, num_stages=2)),
        (256, KernelConfig(64, 64, 256, num_warps=4, num_stages=2)),
    ),
    ("ampere", "half"): (
        (64, KernelConfig(64, 64, 64, num_warps=4, num_stages=3)),
        (128, KernelConfig(64, 64, 128, num_warps=8, num_stages=2)),
        (256, KernelConfig(64, 32, 256, num_warps=8, num_stages=2)),
    ),
    # fp32 without tensor cores (the IEEE default) computes each dot on the CUDA cores from registers: small
    # row tiles, and a single stage where a second one would spill.
    ("hopper", "fp32"): (
        (64, KernelConfig(32, 64, 64, num_warps=8, num_stages=1)),
        (128, KernelConfig(32, 64, 128, num_warps=8, num_stages=1)),
    ),
    ("ampere", "fp32"): (
        (64, KernelConfig(32, 64, 64, num_warps=8, num_stages=1)),
        (128, KernelConfig(32, 64, 128, num_warps=8, num_stages=1)),
    ),
}

# The two GEMMs of the panel path: BLOCK_M × BLOCK_N output tiles, BLOCK_D the reduction chunk.
_PANEL_MATMUL = {
    ("hopper", "half"): KernelConfig(128, 128, 64, num_warps=8, num_stages=4),
    ("hopper", "fp32"): KernelConfig(64, 64, 32, num_warps=4, num_stages=3),
    ("ampere", "half"): KernelConfig(128, 128, 32, num_warps=8, num_stages=3),
    ("ampere", "fp32"): KernelConfig(64, 64, 32, num_warps=8, num_stages=2),
}

# Distillation kernels hold two S tiles (student and teacher), and in the forward the column partials of
# both: 8 warps halve each tile's share per thread. The fused gradient keeps its accumulator on chip for
# d ≤ 64; above, the panel path.
_DISTILL_FORWARD = {
    ("hopper", "half"): KernelConfig(64, 64, 64, num_warps=8, num_stages=2),
    ("hopper", "fp32"): KernelConfig(64, 64, 32, num_warps=8, num_stages=1),
    ("ampere", "half"): KernelConfig(64, 64, 64, num_warps=8, num_stages=2),
    ("ampere", "fp32"): KernelConfig(32, 64, 32, num_warps=8, num_stages=1),
}
_DISTILL_GRADIENT = {
    ("hopper", "half"): KernelConfig(128, 64, 64, num_warps=8, num_stages=2),
    ("hopper", "fp32"): KernelConfig(32, 64, 64, num_warps=8, num_stages=1),
    ("ampere", "half"): KernelConfig(64, 64, 64, num_warps=8, num_stages=2),
    ("ampere", "fp32"): KernelConfig(32, 64, 64, num_warps=8, num_stages=1),
}
_DISTILL_PANEL = {
    ("hopper", "half"): KernelConfig(128, 64, 64, num_warps=8, num_stages=3),
    ("hopper", "fp32"): KernelConfig(64, 64, 32, num_warps=8, num_stages=2),
    ("ampere", "half"): KernelConfig(64, 64, 64, num_warps=8, num_stages=2),
    ("ampere", "fp32"): KernelConfig(32, 64, 32, num_warps=8, num_stages=1),
}
DISTILL_FUSED_MAX_D = 64


def _lookup(table: dict, target: Target, dtype: torch.dtype):
    family = _family(target)
    while (family, _precision(dtype)) not in table:
        family = _FALLBACK[family]
    return table[(family, _precision(dtype))]


def forward_config(target: Target, dtype: torch.dtype, d: int, kernel: str = "lse") -> KernelConfig:
    """Config of a forward kernel (``kernel``: ``"lse"`` or ``"siglip"``) for padded feature dim ``d``.

    Up to d = 128 (16-bit) the row tile fits on chip: one BLOCK_D chunk as wide as d, loaded once per program.
    """
    if target == "interpreter":
        return INTERPRETER_CONFIG
    config = _lookup(_SIGLIP_FORWARD if kernel == "siglip" else _FORWARD, target, dtype)
    if _precision(dtype) == "half" and config.block_d < d <= 2 * config.block_d:
        return dataclasses.replace(config, block_d=2 * config.block_d)
    return config


def fused_gradient(target: Target, d: int, dtype: torch.dtype) -> bool:
    """Whether the fused gradient (accumulator on chip) serves feature dim ``d``; else the panel path.

    In the interpreter only up to one forward chunk (64): the fused kernel's single-chunk S tile then sums in
    the order the forward did, as it does on a GPU at every d (numpy's matmul would not), so the tests' bitwise
    forward/backward consistency holds; larger d exercise the panel path there.
    """
    if target == "interpreter":
        return d <= INTERPRETER_CONFIG.block_d
    return d <= FUSED_MAX_D[_precision(dtype)]


def gradient_config(target: Target, d: int, dtype: torch.dtype) -> KernelConfig:
    """Config of the fused gradient kernel for feature dim ``d`` (padded); needs :func:`fused_gradient`."""
    if target == "interpreter":
        return INTERPRETER_CONFIG
    for bound, config in _lookup(_GRADIENT, target, dtype):
        if d <= bound:
            return config
    raise ValueError(f"the fused gradient takes d ≤ {FUSED_MAX_D[_precision(dtype)]}, got d = {d}")


def panel_configs(target: Target, dtype: torch.dtype) -> tuple[PanelConfig, KernelConfig, KernelConfig]:
    """(panel size, dS kernel config, GEMM config) of the panel gradient path."""
    if target == "interpreter":
        return INTERPRETER_PANEL, INTERPRETER_CONFIG, INTERPRETER_CONFIG
    return (_GPU_PANEL[_precision(dtype)], _lookup(_DS_PANEL, target, dtype),
            _lookup(_PANEL_MATMUL, target, dtype))


def distill_config(target: Target, kernel: str, dtype: torch.dtype) -> KernelConfig:
    """Config of a distillation kernel (``kernel``: ``"forward"``, ``"gradient"`` or ``"panel"``)."""
    if target == "interpreter":
        return INTERPRETER_CONFIG
    table = {"forward": _DISTILL_FORWARD, "gradient": _DISTILL_GRADIENT, "panel": _DISTILL_PANEL}[kernel]
    return _lookup(table, target, dtype)
