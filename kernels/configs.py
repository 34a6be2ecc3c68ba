"""Tile sizes, warps and pipeline depth of every kernel, by target and feature-dim bucket.

There is no autotuning: the interpreter cannot autotune, and a fixed table keeps results bit-reproducible
across runs. Every entry is compiled for sm_80, sm_90, sm_100, gfx90a and gfx942 by the compile checks
(:mod:`fastcontrast.kernels.aot`), which assert zero spills and the shared-memory limit, and read off the
sm_90 binaries' wgmma shapes and ``cp.async`` use.

How the tiles were chosen: ``python -m fastcontrast.kernels.tune`` compiles, for each kernel, family and
precision, candidate (BLOCK_M, BLOCK_N, warps, stages) from the largest down, on the variants with the most
flags on, and keeps the first with no spill, no stack and shared memory within the limit. Larger tiles
reuse each loaded tile more (fewer bytes per FLOP); the resource checks keep them on chip. Constraints:

- Hopper and Blackwell, 16-bit: wgmma (sm_90) wants 64-row tiles per warpgroup and an instruction N ≥ 64,
  so no 16-bit tile below 64×64 is tried there; ``num_stages`` ≥ 2 wherever it fits (1 emits no ``cp.async``).
- Ampere (mma.sync) and AMD (gfx90a, gfx942; 64-wide wavefronts, 64 KiB LDS) have no such constraint; on
  AMD SGPR spills go to VGPR lanes and are allowed, VGPR spills (scratch) are not.
- fp32 operands take twice the registers and shared memory of 16-bit ones: smaller tiles.

The tables are a resource fit, not a timing: no GPU has timed them yet (``python -m fastcontrast gpu-check``
measures what they give).

The gradient has two paths (docs/kernels.md#kernels). For d ≤ :func:`fused_max_d` the
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
    # Data-centre Hopper (sm_90) and Blackwell (sm_100, sm_103) get their own tiles; everything else with
    # mma.sync and 99 KiB of shared memory per block (sm_80 – sm_89, consumer Blackwell sm_120 / sm_121, and
    # parts not known yet) the Ampere ones, which the compile checks hold to that 99 KiB.
    if target[1] == 90:
        return "hopper"
    if 100 <= target[1] < 110:
        return "blackwell"
    return "ampere"


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



def _precision(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


# The interpreter runs tiles as numpy arrays on the CPU: small tiles keep tests fast and still exercise
# ragged edges (n, m, d not multiples of the block), the chunked-d forward (d > 64) and, through the small
# panels, a panel path with several ragged panels in both directions.
INTERPRETER_CONFIG = KernelConfig(block_m=32, block_n=32, block_d=64, num_warps=1, num_stages=1)
INTERPRETER_PANEL = PanelConfig(rows=64, cols=96)

_GPU_PANEL = {"half": PanelConfig(4096, 4096), "fp32": PanelConfig(2048, 4096)}


def _c(block_m: int, block_n: int, block_d: int, warps: int, stages: int) -> KernelConfig:
    return KernelConfig(block_m, block_n, block_d, num_warps=warps, num_stages=stages)


# The tables below are the output of ``python -m fastcontrast.kernels.tune`` (triton 3.9): per kernel, family
# and precision, the largest candidate tile whose hardest variants compile with no spill, no stack and within
# shared memory on the family's architectures. Chosen by resources, not timed: no GPU was at hand.
_FORWARD = {  # lse_forward: (family, precision) -> config; BLOCK_D doubles for 16-bit d in (64, 128]
    ("ampere", "half"): _c(128, 64, 64, 8, 3),
    ("ampere", "fp32"): _c(64, 64, 32, 8, 2),  # 4 warps: 255 registers, and a spill at d <= 32 (resident rows)
    ("hopper", "half"): _c(128, 64, 64, 8, 3),
    ("hopper", "fp32"): _c(32, 32, 32, 4, 1),
    ("blackwell", "half"): _c(64, 64, 64, 8, 2),
    ("blackwell", "fp32"): _c(32, 64, 32, 4, 3),
    ("amd", "half"): _c(128, 64, 64, 8, 3),
    ("amd", "fp32"): _c(64, 64, 32, 4, 3),
}
_SIGLIP_FORWARD = {
    ("ampere", "half"): _c(128, 128, 64, 8, 3),
    ("ampere", "fp32"): _c(64, 64, 32, 4, 3),
    ("hopper", "half"): _c(128, 64, 64, 8, 3),
    ("hopper", "fp32"): _c(64, 64, 32, 4, 3),
    ("blackwell", "half"): _c(128, 128, 64, 8, 3),
    ("blackwell", "fp32"): _c(64, 64, 32, 4, 2),
    ("amd", "half"): _c(128, 64, 64, 8, 3),
    ("amd", "fp32"): _c(64, 64, 32, 4, 3),
}
# The dS kernel of the panel path keeps no running reductions: the largest tiles of all where they fit.
_DS_PANEL = {
    # 128 × 64: at 128 × 128 SigLIP's variant that sums the loss beside dS spills on sm_80.
    ("ampere", "half"): _c(128, 64, 64, 8, 3),
    ("ampere", "fp32"): _c(32, 64, 32, 4, 3),
    ("hopper", "half"): _c(128, 64, 64, 8, 3),
    ("hopper", "fp32"): _c(64, 64, 32, 4, 3),
    ("blackwell", "half"): _c(128, 64, 64, 8, 3),
    ("blackwell", "fp32"): _c(64, 64, 32, 4, 3),
    ("amd", "half"): _c(128, 128, 64, 8, 3),
    ("amd", "fp32"): _c(64, 64, 32, 4, 3),
}

# The symmetric dS kernel (single-tower losses: G = dS + dSᵀ, stored twice on the diagonal) where the table
# above leaves a stack frame: fp32 64 × 64 on sm_90 and sm_100 takes 8 warps.
_DS_PANEL_SYMMETRIC = {
    ("hopper", "fp32"): _c(64, 64, 32, 8, 3),
    ("blackwell", "fp32"): _c(64, 64, 32, 8, 3),
}
# Fused gradient by d bucket (upper bounds), with BLOCK_D the accumulator's width (the whole padded d); the
# widest bucket is the largest d served fused. fp32 without tensor cores (the IEEE default) computes each dot
# on the CUDA cores from registers: small row tiles.
_GRADIENT = {
    ("ampere", "half"): ((64, _c(128, 64, 64, 8, 2)), (128, _c(128, 64, 128, 8, 3)), (256, _c(64, 64, 256, 8, 2))),
    # No fp32 tile with a 128-wide accumulator compiles on sm_80 without spills or stack (the tuner tried them
    # all): fused up to d = 64, the panel path above.
    ("ampere", "fp32"): ((64, _c(32, 64, 64, 8, 2)),),
    # d ≤ 128 only: at 256 every tile spills on sm_90 (the tuner found none); d > 128 takes the panel path.
    ("hopper", "half"): ((64, _c(128, 64, 64, 8, 3)), (128, _c(128, 64, 128, 8, 3))),
    ("hopper", "fp32"): ((64, _c(32, 64, 64, 8, 2)), (128, _c(32, 32, 128, 4, 2))),
    # On sm_100 every 128-wide 16-bit candidate leaves a stack frame in some variant (the tuner tried them all),
    # and a 256-wide tile serving d = 128 would double its tensor work: fused up to d = 64, the panel path above.
    ("blackwell", "half"): ((64, _c(64, 64, 64, 4, 2)),),
    ("blackwell", "fp32"): ((64, _c(32, 32, 64, 4, 2)), (128, _c(32, 32, 128, 4, 2))),
    ("amd", "half"): ((64, _c(64, 32, 64, 4, 2)), (128, _c(64, 32, 128, 4, 2)), (256, _c(64, 32, 256, 4, 2))),
    ("amd", "fp32"): ((64, _c(32, 32, 64, 4, 2)), (128, _c(32, 32, 128, 4, 2))),
}

# The two GEMMs of the panel path: BLOCK_M × BLOCK_N output tiles, BLOCK_D the reduction chunk.
_PANEL_MATMUL = {
    ("ampere", "half"): _c(128, 128, 32, 8, 3),
    ("ampere", "fp32"): _c(64, 64, 32, 4, 3),
    ("hopper", "half"): _c(128, 128, 64, 8, 3),
    ("hopper", "fp32"): _c(64, 64, 32, 4, 3),
    ("blackwell", "half"): _c(128, 128, 64, 8, 3),
    ("blackwell", "fp32"): _c(64, 64, 32, 4, 3),
    ("amd", "half"): _c(128, 128, 32, 8, 3),
    ("amd", "fp32"): _c(64, 64, 32, 4, 3),
}

# Distillation kernels hold two S tiles (student and teacher), and in the forward the column partials of
# both. The fused gradient keeps its accumulator on chip for d ≤ 64; above, the panel path. On Hopper the
# forward runs 128×64 tiles with one stage: m64n64 wgmma without spills (two stages spill; 64-row tiles with
# 8 warps would split N into m64n32).
_DISTILL_FORWARD = {
    ("ampere", "half"): _c(128, 64, 64, 8, 3),
    ("ampere", "fp32"): _c(32, 64, 32, 4, 3),
    ("hopper", "half"): _c(128, 64, 64, 8, 1),
    ("hopper", "fp32"): _c(32, 64, 32, 4, 3),
    ("blackwell", "half"): _c(64, 64, 64, 8, 2),
    ("blackwell", "fp32"): _c(32, 64, 32, 4, 3),
    ("amd", "half"): _c(128, 128, 64, 8, 3),
    ("amd", "fp32"): _c(64, 64, 32, 4, 3),
}
_DISTILL_GRADIENT = {
    ("ampere", "half"): _c(64, 64, 64, 8, 2),
    ("ampere", "fp32"): _c(32, 64, 64, 8, 1),
    ("hopper", "half"): _c(128, 64, 64, 8, 3),
    ("hopper", "fp32"): _c(32, 64, 64, 8, 1),
    ("blackwell", "half"): _c(128, 64, 64, 8, 3),
    ("blackwell", "fp32"): _c(32, 32, 64, 4, 2),
    ("amd", "half"): _c(128, 64, 64, 8, 3),
    ("amd", "fp32"): _c(64, 64, 64, 4, 3),
}
_DISTILL_PANEL = {
    ("ampere", "half"): _c(128, 64, 64, 8, 3),
    ("ampere", "fp32"): _c(64, 64, 32, 4, 3),
    ("hopper", "half"): _c(128, 64, 64, 8, 3),
    ("hopper", "fp32"): _c(32, 64, 32, 4, 3),
    ("blackwell", "half"): _c(128, 64, 64, 8, 3),
    ("blackwell", "fp32"): _c(32, 64, 32, 4, 3),
    ("amd", "half"): _c(128, 64, 64, 8, 3),
    ("amd", "fp32"): _c(64, 64, 32, 4, 3),
}
DISTILL_FUSED_MAX_D = 64

# The masked LSE's kernels (kernels/masked.py), by (family, precision of the model's features, guided): a rule's
# ties need the pair kernel, the forward and the dS kernel to compute each similarity it compares in the same
# arithmetic, so all three take the same entry. A guide tile is an IEEE fp32 dot, on the CUDA cores, beside S:
# small tiles for it, as for fp32 features.
_MASKED = {
    ("ampere", "half", False): _c(64, 64, 32, 4, 2),
    ("hopper", "half", False): _c(64, 64, 32, 4, 2),
    ("blackwell", "half", False): _c(64, 64, 32, 4, 2),
    ("amd", "half", False): _c(64, 64, 32, 4, 2),
    # Two stages spill the guided forward on sm_90 (20 stores, fp32 features, no positive).
    ("hopper", "fp32", True): _c(32, 32, 32, 4, 1),
    # 16-bit on sm_90 takes wgmma m64n64 (8 warps along N), with room for the guide's fp32 tile; 128 × 64 left
    # a stack frame in the guided forward and the guide's pair kernel.
    ("hopper", "half", True): _c(64, 128, 32, 8, 2),
}
_MASKED_SMALL = _c(32, 32, 32, 4, 2)


def _lookup(table: dict, target: Target, dtype: torch.dtype):
    return table[(_family(target), _precision(dtype))]


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


def fused_max_d(target: Target, dtype: torch.dtype) -> int:
    """The largest d the fused gradient keeps on chip for ``target`` and ``dtype``: its widest d bucket in
    the config table (above: the panel path)."""
    if target == "interpreter":
        return INTERPRETER_CONFIG.block_d
    return _lookup(_GRADIENT, target, dtype)[-1][0]


def fused_gradient(target: Target, d: int, dtype: torch.dtype) -> bool:
    """Whether the fused gradient (accumulator on chip) serves feature dim ``d``; else the panel path.

    In the interpreter only up to one forward chunk (64): the fused kernel's single-chunk S tile then sums in
    the order the forward did, as it does on a GPU at every d (numpy's matmul would not), so the tests' bitwise
    forward/backward consistency holds; larger d exercise the panel path there.
    """
    return d <= fused_max_d(target, dtype)


def gradient_config(target: Target, d: int, dtype: torch.dtype) -> KernelConfig:
    """Config of the fused gradient kernel for feature dim ``d`` (padded); needs :func:`fused_gradient`."""
    if target == "interpreter":
        return INTERPRETER_CONFIG
    for bound, config in _lookup(_GRADIENT, target, dtype):
        if d <= bound:
            return config
    raise ValueError(f"the fused gradient takes d ≤ {fused_max_d(target, dtype)}, got d = {d}")


def panel_configs(target: Target, dtype: torch.dtype, *, n: int = 0, m: int = 0, budget_bytes: int = 0,
                  symmetric: bool = False) -> tuple[PanelConfig, KernelConfig, KernelConfig]:
    """(panel size, dS kernel config, GEMM config) of the panel gradient path, for an n×m problem whose
    panels may take ``budget_bytes`` of scratch (:func:`grown_panel`; 0: the base size); ``symmetric``: the
    single-tower dS kernel's config."""
    if target == "interpreter":
        return INTERPRETER_PANEL, INTERPRETER_CONFIG, INTERPRETER_CONFIG
    panel = grown_panel(_GPU_PANEL[_precision(dtype)], n, m, budget_bytes, dtype.itemsize)
    ds_config = _lookup(_DS_PANEL, target, dtype)
    if symmetric:
        ds_config = _DS_PANEL_SYMMETRIC.get((_family(target), _precision(dtype)), ds_config)
    return panel, ds_config, _lookup(_PANEL_MATMUL, target, dtype)


def grown_panel(base: PanelConfig, n: int, m: int, budget_bytes: int, itemsize: int) -> PanelConfig:
    """``base`` doubled (columns first, then rows, alternately) while the panel stays within ``budget_bytes``
    and the n×m matrix still has more than one panel in that direction.

    Why: each panel costs 3 launches (dS, then its two GEMMs), and at the base size (4096² for 16-bit) an
    N = 65,536 step makes 769 of them: at ~4 µs each, 10 % of a modelled CLIP step at d = 512. The launchers
    give the panels the size of the fp32 gradients they produce ((n + m)·d·4 bytes, :func:`panel_budget`), so
    scratch still grows with N·d, never N²: at N = 65,536 a 16-bit panel is 8192 × 16384 (256 MiB) at d = 512,
    16384² (512 MiB) at d = 1280, and the step makes 97 or 49 launches."""
    rows, cols = base.rows, base.cols
    while rows < n or cols < m:
        grow_cols = cols < m and (cols <= rows or rows >= n)
        grown = (rows, 2 * cols) if grow_cols else (2 * rows, cols)
        if min(grown[0], n) * min(grown[1], m) * itemsize > budget_bytes:
            break
        rows, cols = grown
    return PanelConfig(rows, cols)


def panel_budget(n: int, m: int, d: int, panels: int = 1) -> int:
    """The scratch bytes a problem's panels may take: as much as its fp32 gradients, (n + m)·d·4, shared by
    ``panels`` panels that live at once."""
    return (n + m) * d * 4 // panels


def distill_config(target: Target, kernel: str, dtype: torch.dtype) -> KernelConfig:
    """Config of a distillation kernel (``kernel``: ``"forward"``, ``"gradient"`` or ``"panel"``)."""
    if target == "interpreter":
        return INTERPRETER_CONFIG
    table = {"forward": _DISTILL_FORWARD, "gradient": _DISTILL_GRADIENT, "panel": _DISTILL_PANEL}[kernel]
    return _lookup(table, target, dtype)


def masked_config(target: Target, dtype: torch.dtype, guided: bool) -> KernelConfig:
    """The config of the masked LSE's kernels on ``target`` for model features of ``dtype``, with or without a
    guide tile: one entry for the pair kernel, the forward and the dS kernel alike (kernels/masked.py)."""
    if target == "interpreter":
        return INTERPRETER_CONFIG
    return _MASKED.get((_family(target), _precision(dtype), guided), _MASKED_SMALL)
